"""The U-Net learns: short seeded trainings must reach a score, not just run.

A change that keeps every shape right but breaks learning (the loss, the labels,
the augmentation's pairing, the threshold tuning) fails here.
"""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import SHARED_SAMPLE

import test_mito
import training_mito
import unet
import mito.model_files
import mito.presets
import mito.segmenter

# LEARNING_RECIPE reaches a test IoU near 0.79 on the 256 px demo slices (0.7949 when the floor
# was set); an untrained or all-foreground model scores below 0.25 there.
LEARNING_FLOOR_IOU = 0.70


def test_a_short_seeded_training_on_the_demo_data_clears_the_learning_floor(learned_model, demo_dataset, tmp_path):
    settings = json.loads(learned_model.with_suffix(".json").read_text())
    # The threshold and clean-up were tuned on the validation slice, and they are not the untuned defaults.
    assert settings["threshold_tuned_on"] == "valid (1 images)"
    assert settings["threshold_valid_iou"] > LEARNING_FLOOR_IOU
    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(learned_model), "--dataset", str(demo_dataset), "--output",
                           str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["images"] == 2 and summary["mean"]["iou"] > LEARNING_FLOOR_IOU, summary["mean"]
    assert summary["mean"]["precision"] > 0.6 and summary["mean"]["recall"] > 0.6
    history = settings["history"]
    assert history["loss"][-1] < 0.7 * history["loss"][0]


def test_the_floor_is_far_above_what_an_untrained_model_scores(demo_dataset, tmp_path):
    """The floor means something: the same architecture before any step scores well below it."""
    import data
    from mito.metrics import mean_scores, segmentation_scores, tune_threshold

    config = unet.UNetConfig(depth=3, base_filters=8, dropout=0.0, head_filters=0, batch_norm=True)
    model = unet.build_unet(config)
    settings = mito.model_files.default_settings(config)
    _, images, masks = data.load_split(demo_dataset, "test")
    segmenter = mito.segmenter.Segmenter(model, settings)
    probabilities = [segmenter.probability(image) for image in images]
    threshold, _ = tune_threshold(probabilities, masks)  # even tuned on the test slices themselves
    untrained = mean_scores([segmentation_scores(p >= threshold, m) for p, m in zip(probabilities, masks)])
    assert untrained["iou"] < LEARNING_FLOOR_IOU - 0.3


def real_crops(root, size=256):
    """The real EM sample cut to a small dataset: one crop of 2 train, 1 valid and 1 test slices."""
    for split, count in (("train", 2), ("valid", 1), ("test", 1)):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
            for path in sorted((SHARED_SAMPLE / split / kind).glob("*.png"))[:count]:
                iio.imwrite(root / split / kind / path.name, iio.imread(path)[256:256 + size, 256:256 + size])
    return root


@pytest.mark.skipif(not (SHARED_SAMPLE / "train").is_dir(),
                    reason=f"real EM sample not found at {SHARED_SAMPLE} (it lives in ../shared beside the checkout)")
def test_the_cpu_preset_trains_end_to_end_on_real_em_crops(tmp_path, capsys):
    """The recipe the README recommends, with its real settings but a few steps: XLA, the fast engine,
    half scale, batch norm, cosine schedule, dihedral moves, the slice-IoU monitor."""
    dataset = real_crops(tmp_path / "crops")
    path = tmp_path / "cpu.h5"
    assert training_mito.main(["--preset", "cpu", "--dataset", str(dataset), "--model", str(path),
                               "--epochs", "2", "--steps-per-epoch", "3", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "preset cpu" in printed and "XLA on" in printed and "geometry dihedral" in printed
    model, settings = mito.model_files.load_model(path)
    preset = mito.presets.PRESETS["cpu"]
    assert settings.scale == preset["scale"] == 0.5
    assert settings.unet.base_filters == preset["filters"] and settings.unet.batch_norm is True
    options = settings.training["options"]
    for key in ("augment", "geometry", "lr_schedule", "loss", "monitor", "batch_size", "tile_size"):
        assert options[key] == preset[key], key
    assert len(settings.history["val_slice_iou"]) == 2
    assert settings.training["best_epoch"] == int(np.argmax(settings.history["val_slice_iou"])) + 1

    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(path), "--dataset", str(dataset), "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["images"] == 1 and summary["pixels_scored"] == 256 * 256
    assert 0 <= summary["mean"]["iou"] <= 1 and summary["foreground_fraction"] > 0.02
