#!/usr/bin/env python
"""Draw misc/fig.png: a real test slice, its ground truth and the model's prediction, side by side.

  python misc/make_figure.py --model models/em_cpu.h5 --dataset dataset/em_mito_sample

The overlay colours: green = ground truth only (missed), magenta = prediction
only (false alarm), white = both.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mito.cli import Parser, run_cli  # noqa: E402
import mito.files  # noqa: E402
import mito.model_files  # noqa: E402
import mito.overlay  # noqa: E402
import mito.segmenter  # noqa: E402

PROG = "make_figure.py"


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import data
    from mito.metrics import segmentation_scores

    model, settings = mito.model_files.load_model(args.model)
    segmenter = mito.segmenter.Segmenter(model, settings)
    pair = data.find_pairs(args.dataset, "test")[args.index]
    raw, truth = data.load_pair(pair)
    predicted = segmenter.mask(segmenter.probability(raw))
    image = segmenter.normalize(raw)
    scores = segmentation_scores(predicted, truth)

    agreement = np.repeat((image * 255)[..., None], 3, axis=-1)
    colours = {(True, False): (0, 200, 0), (False, True): (255, 0, 255), (True, True): (255, 255, 255)}
    for (in_truth, in_prediction), colour in colours.items():
        where = (truth.astype(bool) == in_truth) & (predicted == in_prediction)
        agreement[where] = 0.45 * agreement[where] + 0.55 * np.array(colour)
    panels = [
        (image, "gray", f"EM slice {pair.image.name}"),
        (mito.overlay.overlay(image, [(truth, (0, 255, 0))]), None, "ground truth"),
        (mito.overlay.overlay(image, [(predicted, (255, 0, 255))]), None, f"prediction ({Path(args.model).name})"),
        (agreement.astype(np.uint8), None, f"green missed, magenta false, white both: IoU {scores['iou']:.3f}"),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(24, 6.4))
    for axis, (picture, cmap, title) in zip(axes, panels):
        axis.imshow(picture, cmap=cmap)
        axis.set_title(title)
        axis.axis("off")
    figure.tight_layout()
    mito.files.atomic_write(args.output, lambda temporary: figure.savefig(temporary, dpi=80))
    print(f"Wrote {args.output} (IoU {scores['iou']:.4f}, Rand index {scores['rand_index']:.4f})")
    return 0


def main(argv=None) -> int:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--model", required=True, help="trained .h5 model")
    parser.add_argument("--dataset", default="dataset/em_mito_sample", help="dataset root (default: %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="which test slice (default: the first)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "fig.png"),
                        help="the PNG to write (default: misc/fig.png)")
    args = parser.parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
