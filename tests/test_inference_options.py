"""The options of test_mito.py and prediction_mito.py, each checked by the masks and scores it gives.

Every case computes what the option should give through ``mito.segmenter.Segmenter`` (the one
inference path) and checks that the script gives exactly that, and that it differs
from what the script gives without the option, so an ignored option fails.
"""

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

import data
import prediction_mito
import test_mito
from mito.metrics import SCORE_NAMES, mean_scores, segmentation_scores
import mito.demo
import mito.errors
import mito.model_files
import mito.segmenter


# Below the learned model's tuned threshold: masks with small objects and holes for the clean-up to act on.
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def loaded(learned_model):
    return mito.model_files.load_model(learned_model)


def expected_masks(loaded, images, threshold, **segmenter_options):
    model, settings = loaded
    segmenter = mito.segmenter.Segmenter(model, settings, threshold=threshold, **segmenter_options)
    probabilities = [segmenter.probability(image) for image in images]
    return probabilities, [segmenter.mask(probability) for probability in probabilities]


# (options, Segmenter keywords, whether the masks must differ from the default's at the same threshold)
CASES = {
    "no-postprocess": (["--no-postprocess"], {"postprocess": {}}, True),
    "min-size": (["--min-size", "40", "--max-hole", "0"], {"postprocess": {"min_size": 40, "max_hole": 0}}, True),
    "max-hole": (["--max-hole", "40", "--min-size", "0"], {"postprocess": {"min_size": 0, "max_hole": 40}}, True),
    "tta": (["--tta"], {"tta": True}, True),
    "precision": (["--precision", "bfloat16"], {"precision": "bfloat16"}, True),
    # Tiles overlapping by the model's receptive field (depth 3: 2 x 64 px) give the whole-image result.
    "small tiles in batches": (["--tile-size", "192", "--overlap", "128", "--batch-size", "3"],
                               {"tile_size": 192, "overlap": 128, "batch_size": 3}, False),
}


@pytest.fixture(scope="module")
def test_slices(loaded, demo_dataset):
    _, settings = loaded
    _, images, masks = data.load_split(demo_dataset, "test")
    return images, masks


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_options_change_the_scores_as_the_segmenter_says(case, loaded, learned_model, demo_dataset,
                                                                  test_slices, tmp_path):
    options, keywords, differs = CASES[case]
    images, truths = test_slices
    _, masks = expected_masks(loaded, images, THRESHOLD, **keywords)
    _, default_masks = expected_masks(loaded, images, THRESHOLD)
    assert any(mask.any() for mask in masks)
    assert differs == any(not np.array_equal(a, b) for a, b in zip(masks, default_masks))
    output = tmp_path / "scores"
    assert test_mito.main(["--model", str(learned_model), "--dataset", str(demo_dataset), "--output", str(output),
                           "--threshold", str(THRESHOLD), *options]) == 0
    summary = json.loads((output / "summary.json").read_text())
    expected = mean_scores([segmentation_scores(mask, truth) for mask, truth in zip(masks, truths)])
    assert summary["mean"] == {name: round(expected[name], 6) for name in SCORE_NAMES}
    assert summary["threshold"] == THRESHOLD
    assert summary["tta"] == keywords.get("tta", False)
    assert summary["precision"] == keywords.get("precision", "float32")
    if "postprocess" in keywords:
        assert summary["postprocess"] == keywords["postprocess"]


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_options_change_the_masks_as_the_segmenter_says(case, loaded, learned_model, demo_dataset,
                                                                   tmp_path):
    options, keywords, _ = CASES[case]
    source = tmp_path / "slices"
    source.mkdir()
    shutil.copy(data.find_pairs(demo_dataset, "test")[0].image, source / "slice.png")
    raw = data.read_image(source / "slice.png")
    probabilities, masks = expected_masks(loaded, [raw], THRESHOLD, **keywords)
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(source), "--model", str(learned_model), "--output", str(output),
                                 "--save-prob", "--threshold", str(THRESHOLD), *options]) == 0
    np.testing.assert_array_equal(iio.imread(output / "slice.png"), masks[0].astype(np.uint8) * 255)
    np.testing.assert_allclose(tifffile.imread(output / "slice_prob.tif"), probabilities[0], atol=1e-6)


@pytest.mark.parametrize("hardware, chosen", [(True, "bfloat16"), (False, "float32")])
def test_precision_auto_is_bfloat16_only_where_the_cpu_has_it(hardware, chosen, loaded, learned_model, demo_dataset,
                                                              tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mito.segmenter, "cpu_supports_bfloat16", lambda: hardware)
    source = tmp_path / "slices"
    source.mkdir()
    shutil.copy(data.find_pairs(demo_dataset, "test")[0].image, source / "slice.png")
    probabilities, _ = expected_masks(loaded, [data.read_image(source / "slice.png")], THRESHOLD, precision=chosen)
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(source), "--model", str(learned_model), "--output", str(output),
                                 "--save-prob", "--threshold", str(THRESHOLD)]) == 0  # the default: auto
    np.testing.assert_allclose(tifffile.imread(output / "slice_prob.tif"), probabilities[0], atol=1e-6)
    assert json.loads((output / "prediction.json").read_text())["precision"] == chosen
    assert f", {chosen} (--precision auto)" in capsys.readouterr().out


def test_tta_averages_the_eight_flips_and_turns(loaded, test_slices):
    model, settings = loaded
    raw = test_slices[0][0][:64, :64]
    image = data.normalize(raw, settings.normalization)
    predict = mito.segmenter.make_predict_fn(model)
    views = []
    for flipped in (image, image[:, ::-1]):
        for turns in range(4):
            turned = np.rot90(flipped, turns)
            back = np.rot90(predict(np.ascontiguousarray(turned)[None, ..., None])[0, ..., 0], -turns)
            views.append(back if flipped is image else back[:, ::-1])
    averaged = mito.segmenter.Segmenter(model, settings, tta=True).probability(raw)
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-6)
    assert not np.allclose(averaged, views[0], atol=1e-4)


def test_split_scores_the_named_split(loaded, learned_model, demo_dataset, tmp_path):
    model, settings = loaded
    _, images, truths = data.load_split(demo_dataset, "valid")
    segmenter = mito.segmenter.Segmenter(model, settings)
    expected = mean_scores([segmentation_scores(segmenter.mask(segmenter.probability(image)), truth)
                            for image, truth in zip(images, truths)])
    output = tmp_path / "valid_scores"
    assert test_mito.main(["--model", str(learned_model), "--dataset", str(demo_dataset), "--split", "valid",
                           "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["split"] == "valid" and summary["images"] == len(images)
    assert summary["mean"] == {name: round(expected[name], 6) for name in SCORE_NAMES}


def test_recursive_mirrors_subfolders_and_skips_labels(tiny_model, tmp_path):
    source = tmp_path / "slices"
    rng = np.random.default_rng(5)
    for relative in ("top.png", "day1/a.png", "day1/deeper/b.png", "day1/labels/a.png"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(source / relative, (rng.random((40, 48)) * 255).astype(np.uint8))
    flat, deep = tmp_path / "flat", tmp_path / "deep"
    assert prediction_mito.main(["--input", str(source), "--model", str(tiny_model), "--output", str(flat)]) == 0
    assert sorted(str(path.relative_to(flat)) for path in flat.rglob("*.png")) == ["top.png"]
    assert prediction_mito.main(["--input", str(source), "--model", str(tiny_model), "--output", str(deep),
                                 "--recursive"]) == 0
    assert sorted(str(path.relative_to(deep)) for path in deep.rglob("*.png")) == \
        ["day1/a.png", "day1/deeper/b.png", "top.png"]


def test_demo_options_and_default_outputs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo paths and the default outputs are relative to where the user is
    mito.demo.make_demo_dataset("dataset/demo", seed=3, shape=(96, 128), splits={"train": 1, "valid": 1, "test": 2})
    Path("models").mkdir()
    for suffix in (".h5", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), Path("models") / f"demo_unet{suffix}")
    assert test_mito.main(["--demo"]) == 0
    summary = json.loads(Path("results/demo_unet/summary.json").read_text())
    assert summary["images"] == 2 and summary["dataset"] == str((tmp_path / "dataset/demo").resolve())
    assert prediction_mito.main(["--demo"]) == 0
    written = sorted(path.name for path in Path("predictions/demo").iterdir() if path.name != "prediction.json")
    assert written == sorted(path.name for path in Path("dataset/demo/unlabeled").iterdir())
    # Without --output, a folder's masks go to predictions/<folder name>.
    assert prediction_mito.main(["--input", "dataset/demo/test/images", "--model", "models/demo_unet.h5"]) == 0
    assert len(list(Path("predictions/images").glob("*.png"))) == 2


@pytest.mark.parametrize("script", [test_mito, prediction_mito])
def test_debug_shows_the_traceback_instead_of_one_line(script, small_dataset, tmp_path):
    where = ["--dataset", str(small_dataset)] if script is test_mito else ["--input", str(small_dataset / "unlabeled")]
    with pytest.raises(mito.errors.ModelError, match="model file not found"):
        script.main([*where, "--model", str(tmp_path / "missing.h5"), "--output", str(tmp_path / "out"), "--debug"])
