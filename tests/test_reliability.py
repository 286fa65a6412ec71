"""Bad input, killed runs and reproducibility (issue: reliability)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from conftest import REPO, TINY_TRAINING, TINY_TRAINING_XLA

import prediction_mito
import test_mito
import training_mito
import mito.augmentation
import mito.checkpoints
import mito.cli
import mito.errors
import mito.model_files


def spawn(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def weights(path):
    model, _ = mito.model_files.load_model(path)
    return model.get_weights()


def assert_same_weights(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def snapshot(folder):
    """Every file under folder with its bytes: to prove nothing was written or changed."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --- reproducibility -------------------------------------------------------------

@pytest.mark.parametrize("tiny", [TINY_TRAINING_XLA, TINY_TRAINING], ids=["xla", "op-determinism"])
def test_same_seed_and_data_give_identical_weights_on_cpu(tiny, small_dataset, tmp_path):
    runs = []
    for name in ("first.h5", "second.h5"):
        assert training_mito.main(["--dataset", str(small_dataset), "--model", str(tmp_path / name), *tiny]) == 0
        runs.append(weights(tmp_path / name))
    assert_same_weights(*runs)
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(tmp_path / "other.h5"),
                               *tiny, "--seed", "7"]) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0], weights(tmp_path / "other.h5")))


# --- killed runs ------------------------------------------------------------------

RESUMABLE = [*TINY_TRAINING_XLA]  # the CPU default: XLA, whose programs must repeat across processes
RESUMABLE[RESUMABLE.index("--epochs") + 1] = "4"
RESUMABLE[RESUMABLE.index("--steps-per-epoch") + 1] = "12"


def saved_epochs(model_path) -> int:
    """The epochs a running training has saved a resume point for (0 while there is none)."""
    try:
        return mito.checkpoints.read_resume_state(model_path)["epoch"]
    except mito.errors.ModelError:
        return 0


def test_training_killed_at_any_moment_keeps_its_best_model_and_resumes_exactly(small_dataset, tmp_path):
    reference = tmp_path / "reference.h5"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(reference), *RESUMABLE]) == 0

    model = tmp_path / "killed.h5"
    process = spawn("training_mito.py", "--dataset", str(small_dataset), "--model", str(model), *RESUMABLE)
    resume_file = mito.checkpoints.resume_json_path(model)
    deadline = time.time() + 300
    while not resume_file.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    # Somewhere in epochs 2-3, maybe mid-save; on a fast CPU these epochs take well under the
    # 1.5 s, so the kill also comes as soon as epoch 3 is saved.
    kill_at = time.time() + random.uniform(0.0, 1.5)
    while time.time() < kill_at and process.poll() is None and saved_epochs(model) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"

    # What is on disk is complete: the best model loads, its JSON parses.
    mito.model_files.load_model(model)
    killed_after = json.loads(resume_file.read_text())["epoch"]
    assert 1 <= killed_after < 4

    assert training_mito.main(["--model", str(model), "--resume"]) == 0
    _, resumed = mito.model_files.load_model(model)
    _, uninterrupted = mito.model_files.load_model(reference)
    assert resumed.history == uninterrupted.history  # all 4 epochs, identical values
    assert len(resumed.history["loss"]) == 4
    assert resumed.training["best_epoch"] == uninterrupted.training["best_epoch"]
    assert resumed.threshold == uninterrupted.threshold
    assert_same_weights(weights(model), weights(reference))
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]
    assert len(model.with_suffix(".csv").read_text().splitlines()) >= 5  # header + 4 epochs (repeats allowed)


def test_resume_needs_a_run_to_resume(tmp_path, capsys):
    assert training_mito.main(["--model", str(tmp_path / "never.h5"), "--resume"]) == 2
    assert "no training of never.h5 to resume" in capsys.readouterr().err


def test_prediction_killed_mid_folder_finishes_on_rerun(tiny_model, tmp_path):
    source, output = tmp_path / "slices", tmp_path / "masks"
    source.mkdir()
    rng = np.random.default_rng(0)
    for index in range(40):
        iio.imwrite(source / f"{index:03d}.png", (rng.random((300, 300)) * 255).astype(np.uint8))
    argv = ["--input", str(source), "--model", str(tiny_model), "--output", str(output)]
    process = spawn("prediction_mito.py", *argv)
    deadline = time.time() + 300
    while len(list(output.glob("[!.]*.png"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prediction finished before it could be killed"
    first_run = snapshot(output)
    assert 3 <= len([name for name in first_run if not name.startswith(".")]) < 40
    for name in first_run:
        if not name.startswith("."):
            assert iio.imread(output / name).shape == (300, 300)  # every visible mask is whole

    assert prediction_mito.main(argv) == 0
    finished = snapshot(output)
    # No temporary files left; prediction.json records the run that finished the folder.
    assert sorted(finished) == [f"{index:03d}.png" for index in range(40)] + ["prediction.json"]
    for name, content in first_run.items():
        if not name.startswith("."):
            assert finished[name] == content  # kept, not redone


# --- bad input --------------------------------------------------------------------

def make_dataset(root, shape=(64, 64), label=None, broken=None):
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for index in range(2):
            iio.imwrite(root / split / "images" / f"{index}.png", (rng.random(shape) * 255).astype(np.uint8))
            iio.imwrite(root / split / "labels" / f"{index}.png",
                        (rng.random(shape) > 0.8).astype(np.uint8) * 255 if label is None else label)
    return root


def jpeg_mask() -> bytes:
    """A 0/255 mask saved as JPEG: compression smears its edges into other values."""
    import io

    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:50] = 255
    buffer = io.BytesIO()
    iio.imwrite(buffer, mask, extension=".jpg")
    return buffer.getvalue()


def breakages():
    """(name, how to break a good dataset) for each case the scripts must refuse."""

    def remove(path):
        return lambda root: (root / path).unlink()

    def write(path, content):
        return lambda root: (root / path).write_bytes(content)

    def image(path, array):
        return lambda root: iio.imwrite(root / path, array)

    def empty_folder(root):
        for file in (root / "valid" / "images").iterdir():
            file.unlink()

    def no_split(root):
        import shutil

        shutil.rmtree(root / "valid")

    return {
        "missing split": (no_split, "valid/images: folder not found"),
        "empty images folder": (empty_folder, "valid/images: no PNG, TIFF or JPEG images"),
        "label without image": (remove("train/images/1.png"), "1.png: no matching file in"),
        "image without label": (remove("train/labels/0.png"), "0.png: no matching file in"),
        "size mismatch": (image("train/labels/1.png", np.zeros((32, 64), np.uint8)), "differs from image size"),
        "corrupt image": (write("train/images/0.png", b"\x89PNG\r\n\x1a\ntruncated"), "0.png: not a readable image"),
        "not an image": (write("valid/images/1.png", b"hello"), "1.png: not a readable image"),
        "label not a mask": (write("train/labels/0.png", jpeg_mask()), "JPEG's lossy compression smears masks"),
    }


@pytest.mark.parametrize("case", list(breakages()))
def test_training_refuses_bad_datasets_before_any_work(case, tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    breakage, message = breakages()[case]
    breakage(root)
    before = snapshot(tmp_path)
    code = training_mito.main(["--dataset", str(root), "--model", str(tmp_path / "models" / "m.h5"), *TINY_TRAINING])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert snapshot(tmp_path) == before  # no model, no log: nothing was written


@pytest.mark.parametrize("case", ["corrupt image", "label not a mask", "size mismatch", "image without label"])
def test_scoring_refuses_bad_test_splits(case, tiny_model, tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    breakage, message = breakages()[case]
    breakage(root)
    # The breakages target train/ or valid/; score that split.
    split = "valid" if case == "not an image" else "train"
    code = test_mito.main(["--dataset", str(root), "--split", split, "--model", str(tiny_model),
                           "--output", str(tmp_path / "scores")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "scores" / "summary.json").exists()


def test_colour_16bit_float_and_tiny_images_are_handled(tiny_model, tmp_path, capsys):
    import data

    source = tmp_path / "slices"
    source.mkdir()
    rng = np.random.default_rng(1)
    iio.imwrite(source / "rgb.png", (rng.random((50, 70, 3)) * 255).astype(np.uint8))
    iio.imwrite(source / "rgba.png", (rng.random((50, 70, 4)) * 255).astype(np.uint8))
    tifffile.imwrite(source / "deep.tif", (rng.random((50, 70)) * 65535).astype(np.uint16))
    tifffile.imwrite(source / "float.tif", rng.random((50, 70)).astype(np.float32) * 1000)
    iio.imwrite(source / "speck.png", np.full((3, 5), 90, np.uint8))
    data._warned_rgb = False
    with pytest.warns(UserWarning, match="converted to grayscale") as warned:
        assert prediction_mito.main(["--input", str(source), "--model", str(tiny_model),
                                     "--output", str(tmp_path / "out")]) == 0
    assert len([w for w in warned if "grayscale" in str(w.message)]) == 1  # said once, not per image
    for name, shape in (("rgb", (50, 70)), ("rgba", (50, 70)), ("deep", (50, 70)), ("float", (50, 70)),
                        ("speck", (3, 5))):
        assert iio.imread(tmp_path / "out" / f"{name}.png").shape == shape


def test_training_pads_images_smaller_than_a_tile(tmp_path):

    root = make_dataset(tmp_path / "data", shape=(40, 50))
    assert training_mito.main(["--dataset", str(root), "--model", str(tmp_path / "m.h5"), *TINY_TRAINING,
                               "--train-tile-size", "128"]) == 0
    settings = json.loads((tmp_path / "m.json").read_text())
    assert settings["train_tile_size"] == 128 and np.isfinite(settings["history"]["loss"]).all()
    # A 40 x 50 slice gives 128 px tiles by reflection, the mask reflected alike.
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50) / 2000
    mask = (image > 0.5).astype(np.uint8)
    tiles = mito.augmentation.TrainingTiles([image], [mask], 128, 2, 1, augment=False, seed=0)
    x, y = tiles.batch(0, 0)
    assert x.shape == y.shape == (2, 128, 128, 1)
    np.testing.assert_array_equal(y[..., 0], (x[..., 0] > 0.5).astype(np.float32))


def models_that_are_wrong(tiny_model, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    (tmp_path / "text.h5").write_text("not a model")
    bad_json = tmp_path / "bad_json.h5"
    bad_json.write_bytes(tiny_model.read_bytes())
    bad_json.with_suffix(".json").write_text("{")
    mismatch = tmp_path / "mismatch.h5"
    mismatch.write_bytes(tiny_model.read_bytes())
    settings = json.loads(tiny_model.with_suffix(".json").read_text())
    settings["unet"]["base_filters"] = 8
    mismatch.with_suffix(".json").write_text(json.dumps(settings))
    lambda_model = tmp_path / "lambda.h5"
    import tensorflow as tf

    inputs = tf.keras.layers.Input((None, None, 1))
    tf.keras.Model(inputs, tf.keras.layers.Lambda(lambda t: t * 0 + 1)(inputs)).save(lambda_model)
    return {
        "missing": (tmp_path / "missing.h5", "model file not found"),
        "not a model": (tmp_path / "text.h5", "text.h5: not a loadable Keras model"),
        "truncated": (truncated, "truncated.h5: not a loadable Keras model"),
        "invalid JSON": (bad_json, "bad_json.json: not valid JSON"),
        "JSON of another model": (mismatch, "mismatch.json: describes a U-Net with"),
        "code inside (Lambda)": (lambda_model, "lambda.h5: not a loadable Keras model"),
    }


@pytest.mark.parametrize("script", ["test", "predict"])
def test_unusable_models_are_refused_with_their_file_named(script, tiny_model, small_dataset, tmp_path, capsys):
    for name, (path, message) in models_that_are_wrong(tiny_model, tmp_path).items():
        output = tmp_path / f"out_{script}"
        if script == "test":
            code = test_mito.main(["--dataset", str(small_dataset), "--model", str(path), "--output", str(output)])
        else:
            code = prediction_mito.main(["--input", str(small_dataset / "unlabeled"), "--model", str(path),
                                         "--output", str(output)])
        error = capsys.readouterr().err.strip()
        assert code == 2, name
        assert message in error and len(error.splitlines()) == 1, name
        assert not output.exists() or not any(output.iterdir()), name


@pytest.mark.parametrize(
    "script, options, message",
    [
        ("training_mito.py", ["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        ("training_mito.py", ["--batch-size", "-2"], "argument --batch-size: must be a positive integer, got -2"),
        ("training_mito.py", ["--train-tile-size", "0"], "argument --train-tile-size: must be a positive integer, got 0"),
        ("training_mito.py", ["--learning-rate", "0"], "argument --learning-rate: must be a positive number"),
        ("training_mito.py", ["--dropout", "1.5"], "dropout=1.5: must be in [0, 1)"),
        ("test_mito.py", ["--tile-size", "64", "--overlap", "64"], "--overlap 64 must be smaller than --tile-size 64"),
        ("prediction_mito.py", ["--threshold", "1.5"], "argument --threshold: must be between 0 and 1"),
        ("prediction_mito.py", ["--overlap", "-1"], "argument --overlap: must be >= 0, got -1"),
        ("prediction_mito.py", ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    ],
)
def test_nonsensical_options_are_refused_in_one_line(script, options, message, tiny_model, small_dataset, tmp_path):
    data_option = ["--input", str(small_dataset / "unlabeled")] if script == "prediction_mito.py" else \
        ["--dataset", str(small_dataset)]
    model = tmp_path / "new.h5" if script == "training_mito.py" else tiny_model
    result = subprocess.run([sys.executable, str(REPO / script), *data_option, "--model", str(model), *options,
                             "--output" if script != "training_mito.py" else "--seed",
                             str(tmp_path / "out") if script != "training_mito.py" else "1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    error = result.stderr.strip()
    assert result.returncode == 2 and message in error
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert not (tmp_path / "new.h5").exists() and not (tmp_path / "out").exists()


def test_tile_sizes_are_rounded_up_to_the_pooling_grid(small_dataset, tmp_path, capsys):
    model = tmp_path / "m.h5"
    options = [*TINY_TRAINING]
    options[options.index("--train-tile-size") + 1] = "50"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(model), *options]) == 0
    assert "tile size 50 is not a multiple of 2**depth = 4: using 52" in capsys.readouterr().out
    assert json.loads(model.with_suffix(".json").read_text())["train_tile_size"] == 52


def test_an_output_folder_that_cannot_be_written_is_named(tiny_model, small_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = prediction_mito.main(["--input", str(small_dataset / "unlabeled"), "--model", str(tiny_model),
                                 "--output", str(blocker / "masks")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "a_file/masks: cannot create the output folder" in error
    code = training_mito.main(["--dataset", str(small_dataset), "--model", str(blocker / "m.h5"), *TINY_TRAINING])
    assert code == 2 and "cannot create the model folder" in capsys.readouterr().err


def test_the_saved_model_has_no_optimizer_and_no_code(tiny_model):
    with h5py.File(tiny_model, "r") as file:
        assert "optimizer_weights" not in file
        assert b"Lambda" not in file.attrs["model_config"].encode() if isinstance(
            file.attrs["model_config"], str) else b"Lambda" not in file.attrs["model_config"]


@pytest.mark.parametrize("level, kept", [
    (0, ["preamble", "I0000", "W0000", "E0000", "plain"]),
    (2, ["E0000", "plain"]),
    (3, ["plain"]),
])
def test_native_start_up_lines_are_held_back_as_the_log_level_asks(level, kept, capfd):

    lines = {
        "preamble": "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000": "I0000 00:00:1795779452.492365    8674 port.cc:153] oneDNN custom operations are on.",
        "W0000": "W0000 00:00:1795779452.492365    8674 some.cc:1] a warning",
        "E0000": "E0000 00:00:1795779452.492365    8674 some.cc:2] an error",
        "plain": "UserWarning: written by Python, kept whatever the level",
    }
    with mito.cli.native_log_filter(level):
        os.write(2, "".join(line + "\n" for line in lines.values()).encode())
    assert capfd.readouterr().err == "".join(lines[name] + "\n" for name in kept)
