#!/usr/bin/env python
"""How far a lower-precision forward pass moves the masks: each slice of a labelled split segmented in float32
and in another precision, with the model's own threshold and clean-up.

Prints per slice and overall: the IoU against the labels in both precisions and its difference, the share of
pixels whose mask differs, and the largest probability difference.

  python benchmarks/precision_agreement.py --dataset dataset/em_mito_sample --model mito_em_cpu
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mito.cli import Parser, run_cli  # noqa: E402

PROG = "precision_agreement.py"


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset root")
    parser.add_argument("--model", required=True, help="a trained model (.h5) or a shipped model's name")
    parser.add_argument("--split", default="test", help="split to segment (default: %(default)s)")
    parser.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float16"),
                        help="the precision compared with float32 (default: %(default)s)")
    return parser.parse_args(argv)


def run(args) -> int:
    import numpy as np

    import data
    from mito.metrics import segmentation_scores
    from mito.model_files import load_model
    from mito.segmenter import Segmenter

    model, settings = load_model(args.model)
    reference, lower = Segmenter(model, settings), Segmenter(model, settings, precision=args.precision)
    pairs, images, truths = data.load_split(args.dataset, args.split)
    print(f"{'slice':<12}{'IoU float32':>12}{'IoU ' + args.precision:>16}{'difference':>12}"
          f"{'pixels differ':>15}{'max |dp|':>10}")
    totals = np.zeros(4)
    for pair, image, truth in zip(pairs, images, truths):
        (probability, mask), (probability_low, mask_low) = reference.segment(image), lower.segment(image)
        iou, iou_low = (segmentation_scores(m, truth)["iou"] for m in (mask, mask_low))
        differ = float(np.mean(mask != mask_low))
        largest = float(np.nanmax(np.abs(probability - probability_low)))
        totals += (iou, iou_low, differ, largest)
        print(f"{pair.image.name:<12}{iou:>12.4f}{iou_low:>16.4f}{iou_low - iou:>+12.4f}{differ:>15.2e}{largest:>10.4f}")
    iou, iou_low, differ, _ = totals / len(pairs)
    print(f"{'mean':<12}{iou:>12.4f}{iou_low:>16.4f}{iou_low - iou:>+12.4f}{differ:>15.2e}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
