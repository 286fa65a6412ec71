"""The shipped models: found by name from anywhere, unchanged since their card was written, and scoring
what their card says on the real datasets (a fresh run of test_mito.py against the card's figures)."""

import hashlib
import json
import re

import numpy as np
import pytest

import data
import prediction_mito
import test_mito
from conftest import REPO, SHARED_SAMPLE
from mito.model_files import PRETRAINED, load_model, shipped_models

CARD = PRETRAINED / "README.md"
SHARED_DATASETS = SHARED_SAMPLE.parent
# | model | dataset | --pixel-size (or -) | split | IoU | Dice | precision | recall |
SCORE_ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| ([\d.]+|-) \| (\w+) \| (0\.\d{4}) \| (0\.\d{4}) \| (0\.\d{4}) "
                       r"\| (0\.\d{4}) \|$")
CHECKSUM_ROW = re.compile(r"^\| `(\w+\.h5)` \| ([0-9a-f]{64}) \|$")
# The card's figures are rounded to 4 decimals and were measured on one CPU; another CPU's arithmetic moves
# an IoU by far less than this, a different model by far more.
TOLERANCE = 1e-3


def card_scores() -> list[tuple]:
    return [match.groups() for line in CARD.read_text().splitlines() if (match := SCORE_ROW.match(line))]


def test_every_shipped_model_has_its_settings_checksum_and_scores_in_the_card():
    names = shipped_models()
    assert "mito_em_cpu" in names
    checksums = {match.group(1): match.group(2) for line in CARD.read_text().splitlines()
                 if (match := CHECKSUM_ROW.match(line))}
    scored = {row[0] for row in card_scores()}
    for name in names:
        path = PRETRAINED / f"{name}.h5"
        assert checksums[path.name] == hashlib.sha256(path.read_bytes()).hexdigest(), f"{path.name} changed"
        assert name in scored
        _, settings = load_model(name)
        assert settings.training["command"].startswith("python training_mito.py")
        assert settings.threshold_tuned_on.startswith("valid")


@pytest.mark.parametrize("model, dataset, pixel_size, split, iou, dice, precision, recall", card_scores())
def test_the_cards_figures_come_back_in_a_fresh_run(model, dataset, pixel_size, split, iou, dice, precision, recall,
                                                    tmp_path):
    root = SHARED_DATASETS / dataset
    if not (root / split).is_dir():
        pytest.skip(f"{dataset} not found at {root} (it lives in ../shared beside the checkout)")
    told = [] if pixel_size == "-" else ["--pixel-size", pixel_size]
    assert test_mito.main(["--model", model, "--dataset", str(root), "--split", split, "--precision", "float32",
                           "--output", str(tmp_path), *told]) == 0
    mean = json.loads((tmp_path / "summary.json").read_text())["mean"]
    measured = [mean[name] for name in ("iou", "dice", "precision", "recall")]
    card = [float(figure) for figure in (iou, dice, precision, recall)]
    np.testing.assert_allclose(measured, card, rtol=0, atol=TOLERANCE)


def test_a_shipped_model_predicts_by_name_from_any_folder(demo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the name alone must find the model
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(demo_dataset / "unlabeled"), "--model", "mito_em_cpu",
                                 "--output", str(output)]) == 0
    masks = sorted(output.glob("*.png"))
    assert len(masks) == len(list((demo_dataset / "unlabeled").glob("*.png"))) > 0
    assert set(np.unique(data.read_image(masks[0]))) <= {0, 255}
    assert (REPO / "pretrained" / "mito_em_cpu.h5").is_file()


def test_a_name_that_is_no_shipped_model_lists_the_shipped_ones(demo_dataset, tmp_path, capsys):
    assert prediction_mito.main(["--input", str(demo_dataset / "unlabeled"), "--model", "mito_nonexistent",
                                 "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "mito_nonexistent: model file not found" in error[0] and "mito_em_cpu" in error[0]
