"""Integration on the real EM sample in ../shared (skipped where it is absent)."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import SHARED_SAMPLE, TINY_TRAINING

pytestmark = pytest.mark.skipif(
    not (SHARED_SAMPLE / "train").is_dir(),
    reason=f"real EM sample not found at {SHARED_SAMPLE} (it lives in ../shared beside the checkout)",
)


def test_train_test_and_predict_on_real_em(tmp_path):
    import prediction_mito
    import test_mito
    import training_mito

    model = tmp_path / "real.h5"
    tiny = [*TINY_TRAINING]
    tiny[tiny.index("--train-tile-size") + 1] = "128"
    assert training_mito.main(["--dataset", str(SHARED_SAMPLE), "--model", str(model), *tiny]) == 0

    scores = tmp_path / "scores"
    assert test_mito.main(["--dataset", str(SHARED_SAMPLE), "--model", str(model), "--output", str(scores)]) == 0
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["images"] == 4 and summary["pixels_scored"] == 4 * 1024 * 1024
    assert 0.05 < summary["foreground_fraction"] < 0.2  # labels 0/1 were read as foreground

    # Real unlabeled slices plus odd-sized crops of one of them.
    source = tmp_path / "slices"
    source.mkdir()
    slices = sorted((SHARED_SAMPLE / "unlabeled").glob("*.png"))
    for path in slices:
        (source / path.name).write_bytes(path.read_bytes())
    full = iio.imread(slices[0])
    iio.imwrite(source / "crop_odd.png", full[:517, :301])
    iio.imwrite(source / "crop_small.png", full[:45, :90])
    output = tmp_path / "masks"
    assert prediction_mito.main(["--input", str(source), "--model", str(model), "--output", str(output)]) == 0
    for path in source.iterdir():
        mask = iio.imread(output / path.name)
        assert mask.shape == iio.imread(path).shape and set(np.unique(mask)) <= {0, 255}
