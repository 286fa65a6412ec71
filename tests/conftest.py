"""Shared fixtures: a small synthetic dataset and a tiny trained model (session-wide)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_SAMPLE = REPO.parent / "shared" / "datasets" / "em_mito_sample"

# Options that make training take seconds on a CPU. XLA's compilation would double that for
# steps this few; the tests that need XLA (training's CPU default) drop "--no-xla".
TINY_TRAINING = [
    "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--train-tile-size", "64",
    "--filters", "4", "--depth", "2", "--workers", "1", "--no-xla",
]
TINY_TRAINING_XLA = [option for option in TINY_TRAINING if option != "--no-xla"]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Synthetic EM slices in our layout: 2 train, 1 valid, 1 test (160 x 200), plus unlabeled/."""
    import mito.demo

    root = tmp_path_factory.mktemp("small") / "dataset"
    return mito.demo.make_demo_dataset(root, seed=7, shape=(160, 200), splits={"train": 2, "valid": 1, "test": 1})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, small_dataset):
    """A model trained for two steps on ``small_dataset`` by training_mito.main."""
    import training_mito

    path = tmp_path_factory.mktemp("models") / "tiny.h5"
    assert training_mito.main(["--dataset", str(small_dataset), "--model", str(path), *TINY_TRAINING]) == 0
    return path


# A short but real training: enough steps on the synthetic demo slices for the U-Net to learn
# mitochondria (tests/test_learning.py holds it to a floor), cheap enough for every CI run.
LEARNING_RECIPE = [
    "--filters", "8", "--depth", "3", "--dropout", "0", "--head-filters", "0", "--batch-norm",
    "--loss", "bce_dice", "--learning-rate", "5e-3", "--epochs", "4", "--steps-per-epoch", "15",
    "--batch-size", "8", "--train-tile-size", "96", "--workers", "1", "--no-xla", "--seed", "42",
]


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """The synthetic demo at 256 x 256: 4 train, 1 valid, 2 test slices, plus unlabeled/."""
    import mito.demo

    root = tmp_path_factory.mktemp("demo") / "dataset"
    return mito.demo.make_demo_dataset(root, seed=2015, shape=(256, 256), splits={"train": 4, "valid": 1, "test": 2})


@pytest.fixture(scope="session")
def learned_model(tmp_path_factory, demo_dataset):
    """A model trained by LEARNING_RECIPE on ``demo_dataset``: its masks have real objects, holes and edges."""
    import training_mito

    path = tmp_path_factory.mktemp("learned") / "learned.h5"
    assert training_mito.main(["--dataset", str(demo_dataset), "--model", str(path), *LEARNING_RECIPE]) == 0
    return path


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """--precision auto reads the CPU; the tests pin it to float32 so that every machine, with or without
    bfloat16 hardware, checks the same arithmetic (tests/test_inference_options.py checks auto itself)."""
    import mito.segmenter

    monkeypatch.setattr(mito.segmenter, "cpu_supports_bfloat16", lambda: False)
