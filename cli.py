"""What the three command-line scripts share: argument parsing and error handling.

Imports nothing heavy, so ``--help`` and option errors answer at once; the
scripts import TensorFlow only after their arguments are parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def add_inference_options(group) -> None:
    """Tiling options of test and prediction; None means 'the model's JSON value'."""
    group.add_argument("--tile-size", type=positive_int, help="tile side for prediction (default: the model's, 1024)")
    group.add_argument("--overlap", type=non_negative_int,
                       help="pixels shared by neighbouring tiles (default: the model's, from its receptive field)")
    group.add_argument("--threshold", type=probability,
                       help="probability threshold (default: the model's, tuned on the validation split)")
    group.add_argument("--batch-size", type=positive_int, default=1, help="tiles per prediction batch (default: 1)")


def inference_setup(args, settings: dict) -> tuple[int, int, float]:
    """Tile size, overlap and threshold: the explicit options, else the model's settings."""
    from data import DataError

    tile_size = args.tile_size if args.tile_size is not None else settings["tile_size"]
    overlap = args.overlap if args.overlap is not None else settings["overlap"]
    threshold = args.threshold if args.threshold is not None else settings["threshold"]
    if overlap >= tile_size:
        raise DataError(f"--overlap {overlap} must be smaller than --tile-size {tile_size}")
    return tile_size, overlap, threshold


def add_debug_option(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run_cli(prog: str, run: Callable[[], int | None], debug: bool = False) -> int:
    """Run a script body: a user error (MitoError) becomes one line on stderr and exit code 2."""
    from data import MitoError

    try:
        return run() or 0
    except MitoError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a disk that fills up or goes read-only while writing
        if debug:
            raise
        print(f"{prog}: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
