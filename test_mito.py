#!/usr/bin/env python
"""Score a trained model on <dataset>/test: Rand index, adapted Rand error, IoU, Dice, precision, recall.

Prints a table (per image and mean) and what kind of mistakes the wrong pixels
are (false objects, missed objects, edges, other), and writes scores.csv (per
image) and summary.json to --output.

Examples:
  python test_mito.py --demo
  python test_mito.py --dataset dataset/SNEMI3D_mito --model models/unet_mito.h5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cli import Parser, add_debug_option, add_inference_options, make_segmenter, run_cli  # noqa: E402

PROG = "test_mito.py"
DEFAULTS = {"dataset": "dataset/SNEMI3D_mito", "model": "models/unet_mito.h5"}
DEMO = {"dataset": "dataset/demo", "model": "models/demo_unet.h5"}
ERROR_BAND = 2  # pixels: wrong pixels this close to a true edge count as boundary errors


def build_parser() -> Parser:
    """The command line of test_mito.py."""
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--demo", action="store_true", help="score the demo model on the demo data")
    parser.add_argument("--dataset", help=f"dataset root with test/images and test/labels (default: {DEFAULTS['dataset']}; demo: {DEMO['dataset']})")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--model", help=f"trained .h5 model (default: {DEFAULTS['model']}; demo: {DEMO['model']})")
    parser.add_argument("--output", help="folder for scores.csv and summary.json (default: results/<model name>)")
    parser.add_argument("--overlays", action="store_true",
                        help="also write overlays/<stem>.png: ground truth outlined in green, prediction in magenta")
    add_inference_options(parser.add_argument_group("prediction"))
    add_debug_option(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in (DEMO if args.demo else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output is None:
        args.output = str(Path("results") / Path(args.model).stem)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: evaluate(args), debug=args.debug)


def evaluate(args: argparse.Namespace) -> int:
    import csv
    import io

    import numpy as np
    from tqdm import tqdm

    import data
    import unet
    from metrics import ERROR_KINDS, SCORE_NAMES, error_breakdown, mean_scores, segmentation_scores

    model, settings = unet.load_model(args.model)
    segmenter = make_segmenter(args, model, settings)
    pairs, images, masks = data.load_split(args.dataset, args.split, settings["normalization"])
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{output}: cannot create the output folder ({error.strerror})") from None
    print(f"Model {args.model}: {segmenter.describe()}")
    print(f"Scoring {len(pairs)} images of {Path(args.dataset) / args.split}")

    rows, errors, started = [], dict.fromkeys(ERROR_KINDS, 0), time.time()
    for pair, image, mask in tqdm(list(zip(pairs, images, masks)), desc="test", unit="image", file=sys.stderr):
        predicted = segmenter.mask(segmenter.probability(image))
        rows.append({"image": pair.image.name, **segmentation_scores(predicted, mask)})
        for kind, count in error_breakdown(predicted, mask, ERROR_BAND).items():
            errors[kind] += count
        if args.overlays:
            (output / "overlays").mkdir(exist_ok=True)
            picture = data.overlay(image, [(mask, (0, 255, 0)), (predicted, (255, 0, 255))])
            data.write_image(output / "overlays" / f"{pair.image.stem}.png", picture)
    seconds = time.time() - started
    mean = mean_scores(rows)

    header = f"{'image':<16}" + "".join(f"{name:>20}" for name in SCORE_NAMES)
    print(header)
    for row in rows + [{"image": "mean", **mean}]:
        print(f"{row['image']:<16}" + "".join(f"{row[name]:>20.4f}" for name in SCORE_NAMES))

    wrong = sum(errors.values())
    shares = {kind: round(count / wrong, 4) if wrong else 0.0 for kind, count in errors.items()}
    print(f"Wrong pixels {wrong}: false objects {shares['false_objects']:.1%}, missed objects "
          f"{shares['missed_objects']:.1%}, within {ERROR_BAND} px of a true edge {shares['boundary']:.1%}, "
          f"other {shares['other']:.1%}")

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["image", *SCORE_NAMES])
    writer.writeheader()
    writer.writerows({key: (f"{value:.6f}" if key != "image" else value) for key, value in row.items()} for row in rows)
    data.atomic_write(output / "scores.csv", lambda temporary: temporary.write_text(table.getvalue()))
    summary = {
        "model": str(Path(args.model).resolve()),
        "dataset": str(Path(args.dataset).resolve()),
        "split": args.split,
        "images": len(rows),
        "threshold": segmenter.threshold,
        "postprocess": segmenter.postprocess,
        "tta": segmenter.tta,
        "precision": segmenter.precision,
        "tile_size": segmenter.tile_size,
        "overlap": segmenter.overlap,
        "mean": {name: round(value, 6) for name, value in mean.items()},
        "errors": {"band_px": ERROR_BAND, "pixels": errors, "shares": shares},
        "seconds_per_image": round(seconds / len(rows), 3),
        "pixels_scored": int(sum(mask.size for mask in masks)),
        "foreground_fraction": round(float(np.mean([mask.mean() for mask in masks])), 4),
    }
    unet.write_json(output / "summary.json", summary)
    print(f"Wrote {output / 'scores.csv'} and {output / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
