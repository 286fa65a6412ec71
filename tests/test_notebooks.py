"""The notebooks run top to bottom on the demo data, and are committed without outputs."""

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat", reason="notebook tests need requirements-dev.txt (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need requirements-dev.txt (nbformat, nbclient)")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_promised_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} == {"seg_mito_keras.ipynb", "seg_mito_albumentations.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_with_outputs_cleared(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    source = "\n".join(cell.source for cell in notebook.cells)
    assert "import data" in source and "unet.build_unet" in source and "metrics.segmentation_scores" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "rand_index" in printed and "mean" in printed
