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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mito.cli import Parser, add_debug_option, add_inference_options, fill_unset, inference_options, run_cli  # noqa: E402

PROG = "test_mito.py"
DEFAULTS = {"dataset": "dataset/SNEMI3D_mito", "model": "models/unet_mito.h5"}
DEMO = {"dataset": "dataset/demo", "model": "models/demo_unet.h5"}


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
    fill_unset(args, DEMO if args.demo else DEFAULTS)
    if args.output is None:
        args.output = str(Path("results") / Path(args.model).stem)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: evaluate(args), debug=args.debug)


def evaluate(args: argparse.Namespace) -> int:
    from mito.evaluation import score_split
    from mito.model_files import at_scale, load_model
    from mito.segmenter import Segmenter

    model, settings = load_model(args.model)
    options = inference_options(args, settings)
    adaptation = None
    if args.adapt_batchnorm:
        import data
        from mito.adaptation import adapt_to_input

        slices = [pair.image for pair in data.find_pairs(args.dataset, args.split)]
        adaptation = adapt_to_input(model, at_scale(settings, options["scale"]), slices)
    segmenter = Segmenter(model, settings, **options)
    score_split(segmenter, args.dataset, args.split, args.output, args.model, args.overlays, adaptation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
