#!/usr/bin/env python
"""How a model's test scores hold up when the slices' brightness, contrast, gamma, focus or noise change.

Other slices of a volume, or another session on the microscope, differ in
exactly these ways. Each perturbation is applied to the raw 8-bit test
slices before the usual normalisation, so this measures what a user would
see; the labels stay as they are.

  python benchmarks/robustness.py --dataset dataset/em_mito_sample --model models/em_cpu.h5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mito.cli import Parser, run_cli  # noqa: E402
import mito.model_files  # noqa: E402
import mito.segmenter  # noqa: E402

PROG = "robustness.py"


def perturbations():
    """name -> function of a float image in 0..255 (the raw slice) returning the perturbed one."""
    import numpy as np
    from scipy import ndimage

    noise = np.random.default_rng(0)
    return {
        "none": lambda image: image,
        "darker (-40 grey levels)": lambda image: image - 40,
        "brighter (+40 grey levels)": lambda image: image + 40,
        "low contrast (x0.6)": lambda image: (image - image.mean()) * 0.6 + image.mean(),
        "high contrast (x1.4)": lambda image: (image - image.mean()) * 1.4 + image.mean(),
        "gamma 0.7": lambda image: 255 * (image / 255) ** 0.7,
        "gamma 1.4": lambda image: 255 * (image / 255) ** 1.4,
        "blur (sigma 1.5 px)": lambda image: ndimage.gaussian_filter(image, 1.5),
        "noise (sigma 12 grey levels)": lambda image: image + noise.normal(0, 12, image.shape),
    }


def run(args) -> int:
    import numpy as np

    import data
    from mito.metrics import SCORE_NAMES, mean_scores, segmentation_scores

    model, settings = mito.model_files.load_model(args.model)
    segmenter = mito.segmenter.Segmenter(model, settings)
    pairs = data.find_pairs(args.dataset, "test")
    raws = [data.read_image(pair.image).astype(np.float32) for pair in pairs]
    masks = [data.binarize_label(data.read_image(pair.label)) for pair in pairs]
    print(f"Model {args.model} on {len(pairs)} test slices of {args.dataset}; mean per slice:")
    print(f"{'perturbation':<30}" + "".join(f"{name:>12}" for name in ("IoU", "Dice", "precision", "recall", "Rand", "ARAND")))
    for name, perturb in perturbations().items():
        rows = []
        for raw, mask in zip(raws, masks):
            image = np.clip(perturb(raw), 0, 255).astype(np.uint8)
            rows.append(segmentation_scores(segmenter.mask(segmenter.probability(image)), mask))
        scores = mean_scores(rows)
        print(f"{name:<30}" + "".join(f"{scores[key]:>12.4f}" for key in SCORE_NAMES), flush=True)
    return 0


def main(argv=None) -> int:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--dataset", default="dataset/em_mito_sample", help="dataset root (default: %(default)s)")
    parser.add_argument("--model", required=True, help="trained .h5 model")
    args = parser.parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
