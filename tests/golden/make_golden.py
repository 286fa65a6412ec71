"""Make the golden files of tests/test_golden.py: a tiny trained model, two inputs, and the masks
and probabilities that prediction_mito.py gave for them.

Run once, from the repository root, with the code as it was before the module redesign
(2026-12-03): ``python tests/golden/make_golden.py``. The test then holds every later
layout of the code to those outputs. Rerunning it overwrites them, so only do that on
purpose, when a change of the outputs is intended and explained.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import mito.demo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def main() -> int:
    import tifffile

    import data
    import prediction_mito
    import training_mito

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dataset = mito.demo.make_demo_dataset(scratch / "data", seed=11, shape=(128, 160),
                                         splits={"train": 2, "valid": 1, "test": 1})
        model = scratch / "model.h5"
        assert training_mito.main(["--dataset", str(dataset), "--model", str(model), "--depth", "2", "--filters",
                                   "4", "--batch-norm", "--dropout", "0", "--head-filters", "0", "--scale", "0.5",
                                   "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "4", "--tile-size",
                                   "48", "--learning-rate", "0.01", "--workers", "1", "--no-xla"]) == 0
        settings = json.loads(model.with_suffix(".json").read_text())
        # Keep what prediction reads; drop the run's paths and history.
        kept = {key: settings[key] for key in ("format", "unet", "normalization", "scale", "train_tile_size",
                                                "tile_size", "overlap", "threshold", "threshold_tuned_on",
                                                "postprocess")}
        kept["postprocess"] = {"min_size": 12, "max_hole": 10}  # clean-up that changes these masks
        shutil.copy(model, HERE / "model.h5")
        (HERE / "model.json").write_text(json.dumps(kept, indent=2) + "\n")

    inputs, expected = HERE / "inputs", HERE / "expected"
    for folder in (inputs, expected):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    rng = np.random.default_rng(23)
    data.write_image(inputs / "slice.png", mito.demo.synthetic_em_slice(rng, (150, 130))[0])
    pages = np.stack([mito.demo.synthetic_em_slice(rng, (90, 110))[0] for _ in range(2)]).astype(np.uint16) * 257
    tifffile.imwrite(inputs / "stack.tif", pages, imagej=True, metadata={"axes": "ZYX"})
    assert prediction_mito.main(["--input", str(inputs), "--model", str(HERE / "model.h5"), "--output",
                                 str(expected), "--save-prob"]) == 0
    print("golden files written to", HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
