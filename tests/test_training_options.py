"""Each training option checked by its effect: what the saved model, its JSON or its resume point holds."""

import contextlib
import json

import numpy as np
import pytest

from conftest import TINY_TRAINING

import training_mito
import unet
import mito.checkpoints
import mito.model_files
import mito.segmenter


def train(dataset, model, *options):
    return training_mito.main(["--dataset", str(dataset), "--model", str(model), *TINY_TRAINING, *options])


def resume_point(model_path):
    """The compiled model saved for --resume, optimizer and loss included."""
    state = mito.checkpoints.read_resume_state(model_path)
    return state, mito.checkpoints.load_resume_model(model_path, state)


@contextlib.contextmanager
def interrupted_after_first_epoch(monkeypatch):
    """Training inside stops right after its first epoch's resume point is saved, as Ctrl-C would stop it."""
    original = mito.checkpoints.TrainingCheckpoints.on_epoch_end

    def stop_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(mito.checkpoints.TrainingCheckpoints, "on_epoch_end", stop_after_first_epoch)
    try:
        yield
    finally:
        monkeypatch.setattr(mito.checkpoints.TrainingCheckpoints, "on_epoch_end", original)


def assert_same_weights(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_cosine_schedule_decays_the_rate_and_an_interrupted_run_resumes_on_it(small_dataset, tmp_path, monkeypatch):
    options = ["--epochs", "2", "--lr-schedule", "cosine", "--learning-rate", "0.01"]
    whole = tmp_path / "whole.h5"
    assert train(small_dataset, whole, *options) == 0
    _, finished = resume_point(whole)
    # CosineDecay to alpha = 1 % of the initial rate over all 2 x 2 steps.
    assert float(finished.optimizer.learning_rate) == pytest.approx(0.01 * 0.01, rel=1e-3)
    assert json.loads(whole.with_suffix(".json").read_text())["training"]["options"]["lr_schedule"] == "cosine"

    constant = tmp_path / "constant.h5"
    assert train(small_dataset, constant, "--learning-rate", "0.01") == 0
    assert float(resume_point(constant)[1].optimizer.learning_rate) == pytest.approx(0.01)

    # The same run stopped after its first epoch (as by Ctrl-C), then resumed: the schedule goes on.
    interrupted = tmp_path / "interrupted.h5"
    with interrupted_after_first_epoch(monkeypatch):
        assert train(small_dataset, interrupted, *options) == 130
    assert mito.checkpoints.read_resume_state(interrupted)["epoch"] == 1
    assert training_mito.main(["--model", str(interrupted), "--resume"]) == 0
    _, resumed = resume_point(interrupted)
    assert float(resumed.optimizer.learning_rate) == pytest.approx(float(finished.optimizer.learning_rate))
    assert_same_weights(resumed.get_weights(), finished.get_weights())
    assert json.loads(interrupted.with_suffix(".json").read_text())["history"] == \
        json.loads(whole.with_suffix(".json").read_text())["history"]


def test_loss_and_foreground_weight_reach_the_compiled_loss(small_dataset, tmp_path):
    path = tmp_path / "weighted.h5"
    assert train(small_dataset, path, "--loss", "bce", "--foreground-weight", "5") == 0
    state, model = resume_point(path)
    assert (model.loss.kind, model.loss.foreground_weight) == ("bce", 5.0)
    assert state["options"]["foreground_weight"] == 5.0
    # The weight multiplies the cross-entropy of mitochondria pixels only.
    truth = np.array([[1.0, 0.0]], np.float32).reshape(1, 1, 2, 1)
    guess = np.array([[0.3, 0.3]], np.float32).reshape(1, 1, 2, 1)
    plain = float(unet.SegmentationLoss("bce")(truth, guess))
    weighted = float(unet.SegmentationLoss("bce", 5.0)(truth, guess))
    foreground, background = -np.log(0.3), -np.log(0.7)
    assert plain == pytest.approx((foreground + background) / 2, rel=1e-5)
    assert weighted == pytest.approx((5 * foreground + background) / 2, rel=1e-5)

    dice = tmp_path / "dice.h5"
    assert train(small_dataset, dice, "--loss", "dice") == 0
    assert resume_point(dice)[1].loss.kind == "dice"


def test_patience_stops_a_run_that_no_longer_improves(small_dataset, tmp_path, capsys):
    path = tmp_path / "patient.h5"
    # A learning rate too small to move float32 weights: the validation loss never improves after epoch 1.
    assert train(small_dataset, path, "--epochs", "5", "--patience", "1", "--monitor", "val_loss",
                 "--learning-rate", "1e-12") == 0
    settings = json.loads(path.with_suffix(".json").read_text())
    assert len(settings["history"]["loss"]) == 2 and settings["training"]["best_epoch"] == 1
    assert "patience 1" in capsys.readouterr().out


def test_monitor_val_iou_keeps_the_epoch_with_the_best_tile_iou(small_dataset, tmp_path):
    path = tmp_path / "iou.h5"
    assert train(small_dataset, path, "--epochs", "3", "--monitor", "val_iou", "--learning-rate", "0.01") == 0
    settings = json.loads(path.with_suffix(".json").read_text())
    logged = settings["history"]["val_iou"]
    assert len(logged) == 3
    assert settings["training"]["best_epoch"] == int(np.argmax(logged)) + 1
    assert settings["training"]["best_val_iou"] == max(logged)


def test_batch_norm_trains_saves_loads_and_resumes(small_dataset, tmp_path):
    path = tmp_path / "bn.h5"
    assert train(small_dataset, path, "--batch-norm") == 0
    model, settings = mito.model_files.load_model(path)
    assert settings.unet.batch_norm is True
    variance = model.get_layer("enc0_bn1").moving_variance.numpy()
    assert not np.allclose(variance, 1.0)  # the statistics were learnt and saved
    assert training_mito.main(["--model", str(path), "--resume", "--epochs", "2"]) == 0
    resumed, settings = mito.model_files.load_model(path)
    assert settings.unet.batch_norm is True and len(settings.history["loss"]) == 2
    assert "enc0_bn1" in {layer.name for layer in resumed.layers}
    # The cpu preset has batch norm; --no-batch-norm takes it out.
    assert training_mito.parse_args(["--preset", "cpu"]).batch_norm is True
    assert training_mito.parse_args(["--preset", "cpu", "--no-batch-norm"]).batch_norm is False


def test_bfloat16_training_saves_a_float32_model_and_resumes_in_bfloat16(small_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    options = ["--precision", "bfloat16", "--epochs", "2"]
    whole = tmp_path / "whole.h5"
    assert train(small_dataset, whole, *options) == 0
    assert "bfloat16" in capsys.readouterr().err  # this test's CPU is taken to lack bfloat16 hardware: warned
    model, settings = mito.model_files.load_model(whole)
    assert settings.training["options"]["precision"] == "bfloat16"
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}  # loads as float32 for every later run
    state, checkpoint = resume_point(whole)
    assert checkpoint.get_layer("enc0_conv1").compute_dtype == "bfloat16"  # the resume point trains on in bfloat16
    interrupted = tmp_path / "interrupted.h5"
    with interrupted_after_first_epoch(monkeypatch):
        assert train(small_dataset, interrupted, *options) == 130
    assert training_mito.main(["--model", str(interrupted), "--resume"]) == 0
    assert_same_weights(mito.model_files.load_model(interrupted)[0].get_weights(), model.get_weights())
    # auto: bfloat16 only on a CPU that has it in hardware
    monkeypatch.setattr(mito.segmenter, "cpu_supports_bfloat16", lambda: True)
    assert training_mito.resolve_training_precision("auto") == "bfloat16"
    monkeypatch.setattr(mito.segmenter, "cpu_supports_bfloat16", lambda: False)
    assert training_mito.resolve_training_precision("auto") == "float32"


def test_architecture_normalisation_and_run_switches_are_recorded_and_used(small_dataset, tmp_path, capsys):
    path = tmp_path / "switches.h5"
    assert train(small_dataset, path, "--depth", "3", "--filters", "6", "--head-filters", "3",
                 "--normalization", "range", "--augmentation", "none", "--no-deterministic", "--no-xla") == 0
    printed = capsys.readouterr().out
    model, settings = mito.model_files.load_model(path)
    assert model.get_layer("head_conv").filters == 3
    assert model.get_layer("enc0_conv1").filters == 6 and "enc2_pool" in {layer.name for layer in model.layers}
    assert (settings.unet.depth, settings.unet.base_filters, settings.unet.head_filters) == (3, 6, 3)
    assert settings.normalization == {"mode": "range"}
    options = settings.training["options"]
    assert options["augmentation"] == "none" and options["deterministic"] is False and options["xla"] is False
    assert "augmentation none" in printed and "deterministic off, XLA off" in printed
    # Prediction reads the stored normalisation: a 16-bit slice is divided by 65535, not stretched.
    import data

    image = (np.random.default_rng(0).random((48, 64)) * 20000).astype(np.uint16)
    segmenter = mito.segmenter.Segmenter(model, settings)
    by_range = segmenter.probability_of_normalized(image.astype(np.float32) / 65535)
    np.testing.assert_allclose(segmenter.probability(image), by_range, atol=1e-6)
    stretched = segmenter.probability_of_normalized(data.normalize(image))  # what the default would have done
    assert not np.allclose(by_range, stretched, atol=1e-3)


def test_the_number_of_tile_threads_does_not_change_the_weights(tiny_model, small_dataset, tmp_path):
    path = tmp_path / "two_threads.h5"
    options = [*TINY_TRAINING]
    options[options.index("--workers") + 1] = "2"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(path), *options]) == 0
    assert_same_weights(mito.model_files.load_model(path)[0].get_weights(), mito.model_files.load_model(tiny_model)[0].get_weights())


def test_overwrite_replaces_the_model_and_its_resume_point(small_dataset, tmp_path):
    path = tmp_path / "replaced.h5"
    assert train(small_dataset, path, "--epochs", "2", "--seed", "1") == 0
    before = mito.model_files.load_model(path)[0].get_weights()
    assert train(small_dataset, path, "--overwrite", "--seed", "2") == 0
    settings = json.loads(path.with_suffix(".json").read_text())
    assert len(settings["history"]["loss"]) == 1 and settings["training"]["options"]["seed"] == 2
    assert mito.checkpoints.read_resume_state(path)["epoch"] == 1  # the old run's resume point is gone
    assert len(list(tmp_path.glob("replaced.resume-epoch*.keras"))) == 1
    after = mito.model_files.load_model(path)[0].get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_resume_with_fewer_epochs_than_done_is_refused(small_dataset, tmp_path, capsys):
    path = tmp_path / "done.h5"
    assert train(small_dataset, path, "--epochs", "2") == 0
    before = path.read_bytes()
    assert training_mito.main(["--model", str(path), "--resume", "--epochs", "1"]) == 2
    assert "--epochs 1 is below the 2 epochs already done" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    from mito.errors import DataError

    with pytest.raises(DataError, match="dataset folder not found"):
        training_mito.main(["--dataset", str(tmp_path / "missing"), "--model", str(tmp_path / "m.h5"), "--debug"])


# --- fine-tuning: --init-from ------------------------------------------------------------

def test_init_from_starts_from_the_parent_and_records_it(tiny_model, small_dataset, tmp_path, capsys):
    import hashlib

    child = tmp_path / "child.h5"
    # No --filters/--depth: they come from the parent, whatever the preset says. A learning rate too small
    # to move float32 weights shows what the run started from.
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(child), "--init-from",
                               str(tiny_model), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
                               "--train-tile-size", "64", "--workers", "1", "--no-xla",
                               "--learning-rate", "1e-12"]) == 0
    parent_model, parent = mito.model_files.load_model(tiny_model)
    model, settings = mito.model_files.load_model(child)
    assert settings.unet == parent.unet and settings.normalization == parent.normalization
    for child_weight, parent_weight in zip(model.get_weights(), parent_model.get_weights(), strict=True):
        np.testing.assert_allclose(child_weight, parent_weight, rtol=0, atol=1e-9)  # a 1e-12 step at most
    record = settings.training["parent"]
    assert record["model"] == "tiny.h5" and record["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert settings.training["options"]["init_from"] == str(tiny_model)
    assert settings.threshold_tuned_on == "valid (1 images)"


def test_init_from_trains_resumes_and_repeats(tiny_model, small_dataset, tmp_path, monkeypatch):
    options = ["--dataset", str(small_dataset), "--init-from", str(tiny_model), "--epochs", "2",
               "--steps-per-epoch", "2", "--batch-size", "2", "--train-tile-size", "64", "--workers", "1",
               "--no-xla", "--learning-rate", "0.01"]
    whole = tmp_path / "whole.h5"
    assert training_mito.main([*options, "--model", str(whole)]) == 0
    interrupted = tmp_path / "interrupted.h5"
    with interrupted_after_first_epoch(monkeypatch):
        assert training_mito.main([*options, "--model", str(interrupted)]) == 130
    assert training_mito.main(["--model", str(interrupted), "--resume"]) == 0
    assert_same_weights(mito.model_files.load_model(interrupted)[0].get_weights(),
                        mito.model_files.load_model(whole)[0].get_weights())
    assert mito.model_files.load_model(interrupted)[1].training["parent"] == \
        mito.model_files.load_model(whole)[1].training["parent"]
    parent_weights = mito.model_files.load_model(tiny_model)[0].get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(parent_weights,
                                                         mito.model_files.load_model(whole)[0].get_weights()))


def test_init_from_without_a_preset_takes_the_finetune_recipe(tiny_model):
    args = training_mito.parse_args(["--init-from", str(tiny_model), "--dataset", "mine"])
    assert args.preset == "finetune"
    assert (args.epochs, args.steps_per_epoch, args.learning_rate) == (6, 200, 3e-4)
    assert training_mito.parse_args(["--init-from", str(tiny_model), "--preset", "cpu"]).learning_rate == 3e-3
    assert training_mito.parse_args(["--dataset", "mine"]).preset == "gpu"


@pytest.mark.parametrize("options, message", [
    (["--filters", "8"], "--filters 8 (the parent has 4) conflicts with the model --init-from starts from"),
    (["--scale", "0.5", "--normalization", "range"], "--scale 0.5 (the parent has 1.0), --normalization range"),
])
def test_init_from_refuses_explicit_options_that_contradict_the_parent(options, message, tiny_model, small_dataset,
                                                                       tmp_path, capsys):
    code = training_mito.main(["--dataset", str(small_dataset), "--model", str(tmp_path / "child.h5"),
                               "--init-from", str(tiny_model), *options])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0]
    assert not (tmp_path / "child.h5").exists()


def test_init_from_a_file_that_is_no_model_is_one_line(small_dataset, tmp_path, capsys):
    (tmp_path / "notes.h5").write_text("not a model")
    code = training_mito.main(["--dataset", str(small_dataset), "--model", str(tmp_path / "child.h5"),
                               "--init-from", str(tmp_path / "notes.h5")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "notes.h5: not a loadable Keras model" in error[0]


# --- several datasets in one run ------------------------------------------------------------

def test_several_datasets_train_one_model_and_are_scored_each(small_dataset, demo_dataset, tmp_path, capsys):
    path = tmp_path / "both.h5"
    assert training_mito.main(["--dataset", str(small_dataset), str(demo_dataset), "--model", str(path),
                               *TINY_TRAINING]) == 0
    printed = capsys.readouterr().out
    assert "each dataset drawn alike" in printed
    _, settings = mito.model_files.load_model(path)
    assert settings.training["dataset"] == [str(small_dataset.resolve()), str(demo_dataset.resolve())]
    per_dataset = settings.training["valid_iou_per_dataset"]
    assert list(per_dataset) == [str(small_dataset), str(demo_dataset)]
    assert all(0 <= iou <= 1 for iou in per_dataset.values())
    for root in (small_dataset, demo_dataset):
        assert f"Validation  {root}: IoU {per_dataset[str(root)]:.4f}" in printed
    assert training_mito.main(["--model", str(path), "--resume", "--epochs", "2"]) == 0  # keeps both
    assert mito.model_files.load_model(path)[1].training["dataset"] == settings.training["dataset"]


def test_datasets_of_other_pixel_sizes_are_resampled_and_the_model_records_its_own(small_dataset, demo_dataset,
                                                                                   tmp_path, capsys):
    import prediction_mito

    path = tmp_path / "sized.h5"
    assert training_mito.main(["--dataset", str(small_dataset), str(demo_dataset), "--pixel-size", "8", "4",
                               "--model", str(path), *TINY_TRAINING]) == 0
    printed = capsys.readouterr().out
    assert f"Resampled   {demo_dataset}: 4 nm to 8 nm per pixel (x0.5)" in printed
    assert f"Resampled   {small_dataset}" not in printed  # the first dataset sets the pixel size
    _, settings = mito.model_files.load_model(path)
    assert settings.pixel_size == 8 and settings.training["options"]["pixel_size"] == [8, 4]
    # Slices of 4 nm are shown to the model at its 8 nm (x0.5 on top of its own scale), at their own size out.
    output = tmp_path / "out"
    assert prediction_mito.main(["--input", str(demo_dataset / "unlabeled"), "--model", str(path),
                                 "--output", str(output), "--pixel-size", "4"]) == 0
    record = json.loads((output / "prediction.json").read_text())
    assert record["scale"] == settings.scale * 0.5 and record["pixel_size"] == 4
    # The tuned clean-up keeps its size in nm²: four times the pixels of 4 nm slices.
    assert record["postprocess"] == {key: value * 4 for key, value in settings.postprocess.items()}
    mask = next(output.glob("*.png"))
    assert data_shape(mask) == data_shape(next((demo_dataset / "unlabeled").iterdir()))
    import test_mito

    capsys.readouterr()
    assert test_mito.main(["--dataset", str(demo_dataset), "--model", str(path), "--pixel-size", "4",
                           "--output", str(tmp_path / "scores")]) == 0
    assert f"slices resampled x{settings.scale * 0.5:g}" in capsys.readouterr().out


def test_the_model_pixel_size_is_the_parents_then_the_first_datasets(capsys):
    import argparse

    from mito.model_files import Settings

    parent = Settings(unet=unet.UNetConfig(), pixel_size=7.5)
    cases = [(parent, [5.0, 4.0], 7.5), (None, [5.0, 4.0], 5.0), (None, None, None), (parent, None, None)]
    for parent_settings, sizes, expected in cases:
        args = argparse.Namespace(pixel_size=sizes, init_from="parent.h5")
        training_mito.choose_model_pixel_size(args, parent_settings)
        assert args.model_pixel_size == expected
    # A parent with a pixel size and none given: nothing is resampled, and the user is told how to.
    assert "parent.h5 was trained at 7.5 nm per pixel; give --pixel-size" in capsys.readouterr().err


def test_pixel_sizes_must_match_the_datasets(small_dataset, demo_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training_mito.main(["--dataset", str(small_dataset), str(demo_dataset), "--pixel-size", "8", "4", "2",
                            "--model", str(tmp_path / "m.h5")])
    assert exit_info.value.code == 2
    assert "--pixel-size: give one value, or one per --dataset root (2)" in capsys.readouterr().err


def test_a_raw_slice_is_resampled_in_its_own_dtype():
    import data

    image = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    half = data.rescale_raw(image, 0.5)
    assert half.dtype == np.uint16 and half.shape == (32, 24)
    assert abs(float(half.mean()) - float(image.mean())) < 0.01 * float(image.mean())


def data_shape(path):
    import data

    return data.read_image(path).shape


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_a_small_dataset_is_drawn_as_often_as_a_large_one(engine):
    import mito.augmentation
    import mito.fast_augmentation

    large = [np.full((256, 256), 0.25, np.float32)]  # one dataset: one large slice
    small = [np.full((64, 64), 0.75, np.float32)] * 2  # another: two small ones, 1/8 of the area
    images, masks = large + small, [np.zeros(image.shape, np.uint8) for image in large + small]
    weights = [1 / 2] + [1 / 4, 1 / 4]
    tiles_class = mito.fast_augmentation.FastTrainingTiles if engine == "fast" else mito.augmentation.TrainingTiles
    fair = tiles_class(images, masks, 32, 64, 4, augment=False, seed=1, image_weights=weights)
    by_area = tiles_class(images, masks, 32, 64, 4, augment=False, seed=1)
    share = np.mean([np.isclose(fair.batch(0, index)[0][:, 0, 0, 0], 0.75).mean() for index in range(4)])
    area_share = np.mean([np.isclose(by_area.batch(0, index)[0][:, 0, 0, 0], 0.75).mean() for index in range(4)])
    assert 0.4 < share < 0.6 and area_share < 0.25
