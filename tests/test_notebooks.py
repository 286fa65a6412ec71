"""The notebooks run top to bottom on the demo data, score their model as test_mito.py does, and draw their figures."""

import json

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
    for call in ("import data", "unet.build_unet", "segmenter.tune_segmentation", "model_files.save_model",
                 "segmenter.Segmenter", "metrics.segmentation_scores"):
        assert call in source, call
    assert "predict_tiled" not in source  # the scripts' inference path, not a copy of it


def with_parameters(notebook, **values):
    """The notebook with its parameters cell's values replaced (as papermill injects them)."""
    cell = next(cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith("# Parameters"))
    lines = cell.source.splitlines()
    for name, value in values.items():
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_saves_its_model_and_scores_it_as_test_mito_does(path, tmp_path, monkeypatch):
    import test_mito

    model = tmp_path / f"{path.stem}.h5"
    # Fewer steps than the notebooks' own defaults: the check is the path, not the score.
    notebook = with_parameters(nbformat.read(path, as_version=4), MODEL=str(model), EPOCHS=2, STEPS_PER_EPOCH=12)
    # After the notebook: its test-split scores, as JSON on the last line.
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import json\nprint(json.dumps({'rows': test_rows, 'mean': metrics.mean_scores(test_rows)}))"))
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    scores = json.loads(printed.strip().splitlines()[-1])
    assert len(scores["rows"]) == 2 and 0.3 < scores["mean"]["iou"] <= 1  # three epochs do learn something

    # Every cell that draws a figure showed it.
    for cell in notebook.cells:
        if cell.cell_type == "code" and "plt.subplots" in cell.source:
            assert any("image/png" in output.get("data", {}) for output in cell.outputs), cell.source[:80]

    # The saved model, scored by the script on the same split, gives the notebook's scores.
    settings = json.loads(model.with_suffix(".json").read_text())
    assert settings["threshold_tuned_on"] == "valid (2 images)"
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(model), "--dataset", str(REPO / "dataset" / "demo"),
                           "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["mean"] == pytest.approx(scores["mean"], abs=1e-6)
