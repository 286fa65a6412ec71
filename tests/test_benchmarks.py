"""The benchmark and figure scripts run end to end on the tiny model (seconds; the real runs are in the README)."""

import importlib.util
import json

import numpy as np
from conftest import REPO
from PIL import Image


def load_script(relative_path):
    spec = importlib.util.spec_from_file_location(relative_path.replace("/", "_")[:-3], REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_forest_baseline_scores_itself_beside_the_unet(tiny_model, small_dataset, tmp_path, capsys):
    baseline = load_script("benchmarks/baseline_random_forest.py")
    report = tmp_path / "comparison.json"
    argv = ["--dataset", str(small_dataset), "--model", str(tiny_model), "--pixels", "4000", "--trees", "5",
            "--output", str(report)]
    assert baseline.main(argv) == 0
    results = json.loads(report.read_text())["results"]
    assert len(results) == 3  # the forest at 0.5 and at its tuned threshold, then the U-Net
    for scores in results.values():
        assert 0.0 <= scores["iou"] <= 1.0 and 0.0 <= scores["rand_index"] <= 1.0
        assert scores["seconds_per_slice"] > 0
    # On the synthetic data the dark mitochondria are easy for the filter features: a broken
    # feature or label pipeline would land near 0.
    assert max(scores["iou"] for name, scores in results.items() if name.startswith("random")) > 0.5
    assert "U-Net IoU - best random forest IoU" in capsys.readouterr().out


def test_robustness_benchmark_scores_every_perturbation(tiny_model, small_dataset, capsys):
    robustness = load_script("benchmarks/robustness.py")
    assert robustness.main(["--dataset", str(small_dataset), "--model", str(tiny_model)]) == 0
    table = capsys.readouterr().out.splitlines()
    for name in robustness.perturbations():
        row = next(line for line in table if line.startswith(name))
        values = [float(value) for value in row[30:].split()]
        assert len(values) == 6 and all(0.0 <= value <= 1.0 for value in values)


def test_figure_script_draws_the_four_panels(tiny_model, small_dataset, tmp_path):
    make_figure = load_script("misc/make_figure.py")
    output = tmp_path / "fig.png"
    assert make_figure.main(["--dataset", str(small_dataset), "--model", str(tiny_model), "--output", str(output)]) == 0
    picture = np.asarray(Image.open(output))
    assert picture.ndim == 3 and picture.shape[1] > 3 * picture.shape[0]  # four panels side by side


def test_own_data_benchmark_trains_and_scores_every_row(learned_model, demo_dataset, small_dataset, tmp_path,
                                                         capsys):
    own_data = load_script("benchmarks/own_data.py")
    quick = "--epochs 1 --steps-per-epoch 2 --batch-size 2 --train-tile-size 64 --workers 1 --no-xla"
    argv = ["--parent", str(learned_model), "--parent-dataset", str(demo_dataset), "--new-dataset",
            str(small_dataset), "--work", str(tmp_path), "--slices", "1", "--skip", "all-slices",
            "--training-options", quick]
    assert own_data.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "IoU" not in line]
    names = [line.split(" | ")[0] for line in rows]
    assert names == ["| zero-shot: the parent", "| zero-shot: the parent, --adapt-batchnorm",
                     "| from scratch, same steps", "| fine-tuned, same steps"]
    one_slice = tmp_path / "data" / "new_1"
    assert [path.name for path in (one_slice / "train" / "images").iterdir()] == ["0001.png"]  # the second of 2
    assert (one_slice / "test").resolve() == (small_dataset / "test").resolve()
    finetuned = json.loads((tmp_path / "finetune_1.json").read_text())
    assert finetuned["training"]["parent"]["model"] == learned_model.name
    assert len(list((small_dataset / "train" / "images").iterdir())) == 2  # the originals untouched


def test_own_data_benchmark_gives_each_dataset_and_its_subsets_their_pixel_size(small_dataset, tmp_path):
    own_data = load_script("benchmarks/own_data.py")
    args = own_data.parse_args(["--parent-dataset", "p", "--new-dataset", str(small_dataset), "--pixel-sizes", "7.5",
                                "5"])
    assert own_data.pixel_size_options(args, "parent") == ["--pixel-size", "7.5"]
    assert own_data.pixel_size_options(args, "new") == ["--pixel-size", "5"]
    one_slice = own_data.subset(small_dataset, 1, tmp_path / "new_1")
    assert own_data.dataset_source(one_slice) == small_dataset.resolve()  # so its training gets 5 nm too
    assert own_data.pixel_size_options(own_data.parse_args(["--parent-dataset", "p", "--new-dataset", "n"]),
                                       "new") == []


def test_precision_agreement_compares_bfloat16_with_float32(learned_model, demo_dataset, capsys):
    agreement = load_script("benchmarks/precision_agreement.py")
    assert agreement.main(["--dataset", str(demo_dataset), "--model", str(learned_model)]) == 0
    lines = capsys.readouterr().out.splitlines()
    mean = next(line for line in lines if line.startswith("mean")).split()
    iou, iou_low, difference, differ = (float(value) for value in mean[1:5])
    assert 0.5 < iou <= 1 and abs(iou_low - iou) < 0.02 and abs(difference - (iou_low - iou)) <= 1.5e-4
    assert 0 <= differ < 0.01
    assert len([line for line in lines if line.endswith(".png") or ".png " in line]) == 2  # the 2 test slices
