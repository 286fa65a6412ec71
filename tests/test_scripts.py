"""The three scripts, called through main(argv) and as subprocesses."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from conftest import REPO, TINY_TRAINING

import prediction_mito
import test_mito
from mito.metrics import SCORE_NAMES
import mito.demo
import mito.metrics
import mito.model_files
import mito.presets
import mito.segmenter

SCRIPTS = ["training_mito.py", "test_mito.py", "prediction_mito.py"]


def run_script(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_tensorflow(script):
    result = run_script("-X", "importtime", str(REPO / script), "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "tensorflow" not in imported and "numpy" not in imported


def test_training_writes_a_loadable_model_with_its_settings(tiny_model):
    model, settings = mito.model_files.load_model(tiny_model)
    assert settings.unet.depth == 2 and settings.unet.base_filters == 4
    assert settings.train_tile_size == 64
    assert settings.overlap == mito.model_files.default_overlap(settings.unet)
    assert settings.threshold_tuned_on == "valid (1 images)"
    # The stored threshold is the one that suits the validation slice best, as mito.metrics.tune_threshold finds it.
    from data import load_split
    from mito.metrics import tune_threshold

    _, images, masks = load_split(settings.training["dataset"], "valid")
    segmenter = mito.segmenter.Segmenter(model, settings)
    assert settings.threshold == tune_threshold([segmenter.probability(image) for image in images], masks)[0]
    assert set(settings.history) >= {"loss", "val_loss", "iou", "val_iou"}
    assert settings.training["replicas"] >= 1 and settings.training["global_batch_size"] >= 2
    assert settings.normalization["mode"] == "percentile"
    assert settings.training["command"].startswith("python training_mito.py --dataset ")
    assert settings.training["versions"]["tensorflow"].startswith("2.")
    for sibling in (tiny_model.with_suffix(".csv"), tiny_model.with_name("tiny_curves.png")):
        assert sibling.stat().st_size > 0
    assert not [p for p in tiny_model.parent.iterdir() if "partial" in p.name]


def test_training_refuses_to_replace_a_model_without_overwrite(tiny_model, small_dataset, capsys):
    import training_mito

    before = tiny_model.read_bytes()
    code = training_mito.main(["--dataset", str(small_dataset), "--model", str(tiny_model), *TINY_TRAINING])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert tiny_model.read_bytes() == before


def test_test_script_scores_every_image(tiny_model, small_dataset, tmp_path, capsys):
    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(tiny_model), "--dataset", str(small_dataset), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "rand_index" in printed and "mean" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert summary["images"] == 1 and set(summary["mean"]) == set(SCORE_NAMES)
    rows = (output / "scores.csv").read_text().splitlines()
    assert rows[0].split(",") == ["image", *SCORE_NAMES] and len(rows) == 2
    per_image = dict(zip(SCORE_NAMES, map(float, rows[1].split(",")[1:])))
    assert summary["mean"] == pytest.approx(per_image, abs=1e-6)  # one image: its scores are the mean
    # The scores and the wrong pixels are those of the model's masks, as the Segmenter makes them.
    from data import load_split
    from mito.metrics import error_breakdown, segmentation_scores

    model, settings = mito.model_files.load_model(tiny_model)
    _, images, truths = load_split(small_dataset, "test")
    segmenter = mito.segmenter.Segmenter(model, settings)
    predicted = segmenter.mask(segmenter.probability(images[0]))
    assert per_image == pytest.approx(segmentation_scores(predicted, truths[0]), abs=1e-6)
    errors = summary["errors"]
    assert errors["pixels"] == error_breakdown(predicted, truths[0], errors["band_px"])
    wrong = sum(errors["pixels"].values())
    assert wrong == np.count_nonzero(predicted != truths[0]) > 0  # a 2-step model errs
    assert sum(errors["shares"].values()) == pytest.approx(1, abs=1e-3)
    assert f"Wrong pixels {wrong}:" in printed


def test_prediction_writes_one_mask_per_image_of_any_size(tiny_model, small_dataset, tmp_path):
    source = tmp_path / "slices"
    source.mkdir()
    rng = np.random.default_rng(0)
    shapes = {"odd.png": (37, 203), "tiny.tif": (9, 9), "wide.jpg": (64, 301)}
    for name, shape in shapes.items():
        iio.imwrite(source / name, (rng.random(shape) * 255).astype(np.uint8)) if not name.endswith(".tif") \
            else tifffile.imwrite(source / name, (rng.random(shape) * 4095).astype(np.uint16))
    output = tmp_path / "masks"
    argv = ["--input", str(source), "--model", str(tiny_model), "--output", str(output), "--save-prob"]
    assert prediction_mito.main(argv) == 0
    for name, shape in shapes.items():
        stem = name.split(".")[0]
        mask = iio.imread(output / f"{stem}.png")
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        probability = tifffile.imread(output / f"{stem}_prob.tif")
        assert probability.shape == shape and probability.dtype == np.float32
        assert 0 <= probability.min() and probability.max() <= 1
    assert sorted(p.name for p in source.iterdir()) == sorted(shapes)  # input folder untouched


def test_prediction_keeps_existing_outputs_unless_overwrite(tiny_model, small_dataset, tmp_path, capsys):
    source = small_dataset / "unlabeled"
    output = tmp_path / "masks"
    argv = ["--input", str(source), "--model", str(tiny_model), "--output", str(output)]
    assert prediction_mito.main(argv) == 0
    first = sorted(output.glob("*.png"))
    assert len(first) == len(list(source.iterdir())) == 2
    assert (output / "prediction.json").is_file()
    for path in first:
        path.write_bytes(b"user's own file")
    assert prediction_mito.main(argv) == 0
    assert "kept 2 existing" in capsys.readouterr().out
    assert all(path.read_bytes() == b"user's own file" for path in first)
    assert prediction_mito.main(argv + ["--overwrite"]) == 0
    assert all(iio.imread(path).ndim == 2 for path in first)


def test_prediction_of_a_dataset_root_covers_its_images_but_not_its_labels(tiny_model, small_dataset, tmp_path):
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(small_dataset), "--model", str(tiny_model), "--output", str(output)]) == 0
    written = sorted(str(path.relative_to(output)) for path in output.rglob("*.png"))
    expected = sorted(str(path.relative_to(small_dataset)) for path in small_dataset.rglob("*.png")
                      if "labels" not in path.parts)
    assert written == expected and len(written) == 6


def test_prediction_never_writes_into_its_input_folder(tiny_model, small_dataset, capsys):
    source = small_dataset / "unlabeled"
    before = sorted(source.iterdir())
    assert prediction_mito.main(["--input", str(source), "--model", str(tiny_model), "--output", str(source)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert sorted(source.iterdir()) == before


def test_prediction_reports_unreadable_files_and_goes_on(tiny_model, tmp_path, capsys):
    source = tmp_path / "slices"
    source.mkdir()
    iio.imwrite(source / "good.png", np.full((40, 40), 128, np.uint8))
    (source / "bad.png").write_bytes(b"not an image")
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(source), "--model", str(tiny_model), "--output", str(output)]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["good.png", "prediction.json"]


def test_scripts_run_as_subprocesses(tiny_model, small_dataset, tmp_path):
    scored = run_script("test_mito.py", "--model", str(tiny_model), "--dataset", str(small_dataset),
                        "--output", str(tmp_path / "scores"))
    assert scored.returncode == 0, scored.stderr
    assert (tmp_path / "scores" / "summary.json").exists()
    predicted = run_script("prediction_mito.py", "--input", str(small_dataset / "unlabeled"),
                           "--model", str(tiny_model), "--output", str(tmp_path / "masks"))
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "masks").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["test_mito.py", "--model", "missing.h5"], "missing.h5: model file not found"),
        (["prediction_mito.py", "--input", "no_such_folder"], "no_such_folder: input folder not found"),
        (["training_mito.py", "--dataset", "no_such_dataset"], "no_such_dataset: dataset folder not found"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, tmp_path):
    result = run_script(str(REPO / argv[0]), *argv[1:], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines and message in lines[-1] and "Traceback" not in result.stderr


def test_demo_training_generates_data_trains_and_scores(tmp_path, monkeypatch, capsys):
    import training_mito

    monkeypatch.chdir(tmp_path)  # the demo writes results/ in the working directory
    root, model = tmp_path / "demo", tmp_path / "demo.h5"
    argv = ["--demo", "--dataset", str(root), "--model", str(model), "--epochs", "1", "--steps-per-epoch", "2"]
    assert training_mito.main(argv) == 0
    assert len(list((root / "train" / "images").iterdir())) == 8 and (root / "unlabeled").is_dir()
    _, settings = mito.model_files.load_model(model)
    assert settings.unet.base_filters == mito.presets.PRESETS["demo"]["filters"]
    assert "Scoring the demo model" in capsys.readouterr().out
    summary = json.loads((tmp_path / "results" / "demo" / "summary.json").read_text())
    assert summary["images"] == 2


def test_a_tiff_stack_gives_mask_instance_and_overlay_stacks_and_measurements(learned_model, tmp_path):
    import csv

    from mito.metrics import label_instances

    rng = np.random.default_rng(2)
    pages = [mito.demo.synthetic_em_slice(rng, (120, 150))[0] for _ in range(3)]
    stack = (np.stack(pages).astype(np.uint16) * 16)  # 16-bit, like many microscopes
    tifffile.imwrite(tmp_path / "volume.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    output = tmp_path / "out"
    argv = ["--input", str(tmp_path / "volume.tif"), "--model", str(learned_model), "--output", str(output),
            "--instances", "--pixel-size", "8", "--overlays", "--save-prob"]
    assert prediction_mito.main(argv) == 0
    masks = tifffile.imread(output / "volume.tif")
    assert masks.shape == (3, 120, 150) and masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 255}
    with tifffile.TiffFile(output / "volume.tif") as tiff:
        assert tiff.is_imagej and tiff.imagej_metadata["images"] == 3  # one Z stack in Fiji / napari
    instances = tifffile.imread(output / "volume_instances.tif")
    assert instances.shape == masks.shape and instances.dtype == np.uint16
    assert np.array_equal(instances > 0, masks > 0)
    probability = tifffile.imread(output / "volume_prob.tif")
    assert probability.shape == (3, 120, 150) and probability.dtype == np.float32
    overlay = tifffile.imread(output / "volume_overlay.tif")
    assert overlay.shape == (3, 120, 150, 3) and overlay.dtype == np.uint8
    with open(output / "measurements.csv") as file:
        rows = list(csv.DictReader(file))
    with open(output / "slices.csv") as file:
        slices = list(csv.DictReader(file))
    assert [int(row["slice"]) for row in slices] == [0, 1, 2]
    for index, page in enumerate(masks):
        expected = label_instances(page)
        assert expected.max() >= 2  # the learned model finds several mitochondria on each page
        assert int(slices[index]["count"]) == expected.max()
        page_rows = [row for row in rows if int(row["slice"]) == index]
        assert len(page_rows) == expected.max()
        assert sum(float(row["area_px"]) for row in page_rows) == (page > 0).sum()
    for row in rows:  # --pixel-size 8: areas in nm^2 are 64 times the pixel counts, lengths 8 times
        assert float(row["area_nm2"]) == pytest.approx(float(row["area_px"]) * 64)
        assert float(row["major_axis_nm"]) == pytest.approx(float(row["major_axis_px"]) * 8)


def test_instances_and_overlays_for_a_folder_and_a_rerun_that_adds_them(learned_model, demo_dataset, tmp_path):
    from skimage.segmentation import find_boundaries

    from mito.metrics import label_instances

    source, output = demo_dataset / "unlabeled", tmp_path / "out"
    base = ["--input", str(source), "--model", str(learned_model), "--output", str(output)]
    assert prediction_mito.main(base) == 0
    masks_before = {path.name: path.read_bytes() for path in output.glob("*.png")}
    assert len(masks_before) == 2
    assert prediction_mito.main(base + ["--instances", "--overlays"]) == 0  # derived from the existing masks
    assert {path.name: path.read_bytes() for path in output.glob("[!.]*[0-9].png")} == masks_before
    for name in masks_before:
        stem = name.removesuffix(".png")
        mask = iio.imread(output / name) > 0
        assert mask.any()
        np.testing.assert_array_equal(tifffile.imread(output / f"{stem}_instances.tif"), label_instances(mask))
        overlay = iio.imread(output / f"{stem}_overlay.png")
        assert overlay.shape == (*mask.shape, 3)
        outline = find_boundaries(mask, mode="inner")
        assert (overlay[outline] == (255, 0, 255)).all() and not (overlay[~outline] == (255, 0, 255)).all(-1).any()
    assert (output / "measurements.csv").read_text().startswith("image,slice,label,area_px")


def test_test_script_overlays_show_truth_and_prediction(learned_model, demo_dataset, tmp_path):
    from skimage.segmentation import find_boundaries

    import data

    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(learned_model), "--dataset", str(demo_dataset), "--output", str(output),
                           "--overlays"]) == 0
    pictures = sorted((output / "overlays").glob("*.png"))
    assert len(pictures) == 2
    model, settings = mito.model_files.load_model(learned_model)
    segmenter = mito.segmenter.Segmenter(model, settings)
    _, images, truths = data.load_split(demo_dataset, "test")
    for picture, image, truth in zip(pictures, images, truths):
        overlay = iio.imread(picture)
        predicted = segmenter.mask(segmenter.probability(image))
        truth_outline, predicted_outline = find_boundaries(truth > 0, mode="inner"), find_boundaries(predicted, mode="inner")
        assert truth_outline.any() and predicted_outline.any()
        # Ground truth in green, the prediction in magenta on top of it.
        assert (overlay[predicted_outline] == (255, 0, 255)).all()
        assert (overlay[truth_outline & ~predicted_outline] == (0, 255, 0)).all()


def tf_value(event):
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


def test_training_can_log_for_tensorboard(small_dataset, tmp_path):
    import training_mito

    logs = tmp_path / "tb"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(tmp_path / "m.h5"),
                               *TINY_TRAINING, "--tensorboard", str(logs)]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((tmp_path / "m.json").read_text())["history"]
    for run, prefix in (("train", ""), ("validation", "val_")):
        events = EventAccumulator(str(logs / run), size_guidance={"tensors": 0})
        events.Reload()
        assert "epoch_loss" in events.Tags()["tensors"], events.Tags()
        logged = [float(tf_value(event)) for event in events.Tensors("epoch_loss")]
        assert logged == pytest.approx(history[prefix + "loss"], rel=1e-5)


def test_a_model_trained_at_half_scale_keeps_its_scale_and_masks_slices_at_their_size(small_dataset, tmp_path, capsys):
    import training_mito

    path = tmp_path / "half.h5"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(path), *TINY_TRAINING,
                               "--scale", "0.5"]) == 0
    assert "resampled x0.5" in capsys.readouterr().out
    assert training_mito.main(["--model", str(path), "--resume", "--epochs", "2"]) == 0  # keeps the run's scale
    assert "resampled x0.5" in capsys.readouterr().out
    _, settings = mito.model_files.load_model(path)
    assert settings.scale == 0.5 and settings.training["options"]["scale"] == 0.5
    source, output = tmp_path / "slices", tmp_path / "masks"
    source.mkdir()
    iio.imwrite(source / "odd.png", (np.random.default_rng(3).random((37, 203)) * 255).astype(np.uint8))
    assert prediction_mito.main(["--input", str(source), "--model", str(path), "--output", str(output)]) == 0
    assert iio.imread(output / "odd.png").shape == (37, 203)
    assert test_mito.main(["--model", str(path), "--dataset", str(small_dataset), "--output",
                           str(tmp_path / "scores")]) == 0
    assert json.loads((tmp_path / "scores" / "summary.json").read_text())["pixels_scored"] == 160 * 200


def test_training_picks_the_epoch_with_the_best_whole_slice_validation_iou(small_dataset, tmp_path):
    import training_mito
    from data import load_split
    from mito.metrics import tune_threshold

    path = tmp_path / "slice.h5"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(path), *TINY_TRAINING,
                               "--epochs", "3", "--monitor", "val_slice_iou", "--learning-rate", "0.01"]) == 0
    model, settings = mito.model_files.load_model(path)
    logged = settings.history["val_slice_iou"]
    assert len(logged) == 3 and all(0 <= value <= 1 for value in logged)
    assert settings.training["best_epoch"] == int(np.argmax(logged)) + 1
    assert settings.training["best_val_slice_iou"] == max(logged)
    # The logged score is the saved model's: whole valid slices, as test_mito.py predicts them, best threshold.
    _, images, masks = load_split(small_dataset, "valid")
    segmenter = mito.segmenter.Segmenter(model, settings)
    _, iou = tune_threshold([segmenter.probability(image) for image in images], masks)
    assert iou == pytest.approx(max(logged), abs=1e-6)
    assert "val_slice_iou" in path.with_suffix(".csv").read_text().splitlines()[0]
