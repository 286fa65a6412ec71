"""A model trained before the module redesign predicts the very masks it predicted then.

tests/golden/ holds a tiny model (depth 2, batch norm, trained at half scale, with a
clean-up that acts), an 8-bit slice and a 16-bit two-page TIFF stack, and what
prediction_mito.py wrote for them when tests/golden/make_golden.py made the files.
"""

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

import prediction_mito

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_an_old_model_predicts_the_same_masks_and_probabilities(tmp_path):
    model = tmp_path / "model.h5"
    for suffix in (".h5", ".json"):
        shutil.copy(GOLDEN / f"model{suffix}", model.with_suffix(suffix))
    output = tmp_path / "out"
    assert prediction_mito.main(["--input", str(GOLDEN / "inputs"), "--model", str(model), "--output",
                                 str(output), "--save-prob"]) == 0
    expected = GOLDEN / "expected"
    # The old code wrote the same files but for prediction.json, the record of how they were made.
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [path.name for path in expected.iterdir()] + ["prediction.json"])
    mask = iio.imread(output / "slice.png")
    np.testing.assert_array_equal(mask, iio.imread(expected / "slice.png"))
    assert 0 < np.count_nonzero(mask) < mask.size
    np.testing.assert_array_equal(tifffile.imread(output / "stack.tif"), tifffile.imread(expected / "stack.tif"))
    for name in ("slice_prob.tif", "stack_prob.tif"):
        np.testing.assert_allclose(tifffile.imread(output / name), tifffile.imread(expected / name), atol=1e-6)
