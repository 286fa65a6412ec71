"""What the command-line scripts share: argument parsing, quiet TensorFlow start-up, one-line errors.

Imports nothing heavy, so ``--help`` and option errors answer at once; the
scripts import TensorFlow only after their arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(convert, accept, expected: str, must: str):
    """An argparse type: ``convert`` the text, then refuse values that ``accept`` rejects, in one line."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {value}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "a positive integer", "a positive integer")
non_negative_int = _number(int, lambda value: value >= 0, "an integer >= 0", ">= 0")
positive_float = _number(float, lambda value: value > 0, "a positive number", "a positive number")
# 4 is data.MAX_SCALE, written out so that --help needs no NumPy.
scale_factor = _number(float, lambda value: 0 < value <= 4, "a number", "above 0 and at most 4 (the largest scale)")


def tile_size(text: str) -> int | str:
    """--tile-size: a positive integer, or 'auto' (sized to the memory budget, mito.tile_memory)."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


probability = _number(float, lambda value: 0 < value < 1, "a number between 0 and 1",
                      "between 0 and 1 (exclusive)")


def shard_option(text: str) -> tuple[int, int]:
    """argparse type for --shard: 'I/N' with 1 <= I <= N."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, such as 2/8, got {text!r}")
    return int(index), int(count)


def devices_option(text: str) -> str:
    """argparse type for --devices: 'all', 'cpu', 'cpu:N' or comma-separated GPU indices."""
    text = text.strip().lower()
    if text in ("all", "cpu"):
        return text
    count = text[4:] if text.startswith("cpu:") else None
    if count is not None and count.isdigit() and int(count) >= 1:
        return text
    if count is None and all(part.strip().isdigit() for part in text.split(",")):
        return ",".join(part.strip() for part in text.split(","))
    raise argparse.ArgumentTypeError(f"expected 'all', 'cpu', 'cpu:N' or GPU indices like '0,1', got {text!r}")


def add_inference_options(group) -> None:
    """Options of test and prediction; None means 'the model's JSON value'."""
    group.add_argument("--tile-size", type=tile_size,
                       help="tile side for prediction, in the pixels the model sees, or 'auto': the largest tile "
                            "whose forward pass fits in about 1.1 GB, at least 1280 (default: the model's; auto "
                            "for models trained since it exists, 1280 for older ones)")
    group.add_argument("--overlap", type=non_negative_int,
                       help="pixels shared by neighbouring tiles (default: the model's, from its receptive field)")
    group.add_argument("--threshold", type=probability,
                       help="probability threshold (default: the model's, tuned on the validation split)")
    group.add_argument("--min-size", type=non_negative_int,
                       help="remove objects smaller than this many pixels (default: the model's, tuned on valid)")
    group.add_argument("--max-hole", type=non_negative_int,
                       help="fill holes of at most this many pixels (default: the model's, tuned on valid)")
    group.add_argument("--no-postprocess", action="store_true", help="keep the thresholded mask as it is")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: average the 8 flips/rotations (8 times slower)")
    group.add_argument("--adapt-batchnorm", action="store_true",
                       help="adapt the model to these slices without labels before predicting: its batch-norm "
                            "statistics are re-estimated on up to 16 slices spread over the input (AdaBN), for EM "
                            "unlike the model's training data; recorded in the outputs (needs a batch-norm model)")
    group.add_argument("--pixel-size", type=positive_float, metavar="NM",
                       help="nm per pixel of these slices: a model that records the pixel size it was trained at "
                            "sees them resampled to it (for prediction also the unit of the --instances "
                            "measurements); without it slices are taken to have the model's pixel size")
    group.add_argument("--batch-size", type=positive_int, default=1, help="tiles per prediction batch (default: 1)")
    group.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="arithmetic of the forward pass (default: auto, which is bfloat16 on a CPU with bfloat16 "
                            "in hardware, AVX512-BF16 or AMX, and float32 elsewhere, GPUs included; the choice is "
                            "printed and recorded with the outputs)")


def fill_unset(args, values: dict) -> None:
    """Give each option in ``values`` its value there, unless the command line set it."""
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def inference_options(args, settings) -> dict:
    """The Segmenter's keyword arguments from the inference options; None leaves the model's value."""
    postprocess = dict(settings.postprocess)
    pixel_size = getattr(args, "pixel_size", None)
    if pixel_size and settings.pixel_size:  # the tuned sizes are in the training slices' pixels: same area in nm²
        area_factor = (settings.pixel_size / pixel_size) ** 2
        postprocess = {key: round(value * area_factor) for key, value in postprocess.items()}
    if args.min_size is not None:
        postprocess["min_size"] = args.min_size
    if args.max_hole is not None:
        postprocess["max_hole"] = args.max_hole
    if args.no_postprocess:
        postprocess = {}
    return dict(tile_size=args.tile_size, overlap=args.overlap, threshold=args.threshold, postprocess=postprocess,
                tta=args.tta, batch_size=args.batch_size, precision=args.precision,
                scale=pixel_size_scale(args, settings))


def pixel_size_scale(args, settings) -> float | None:
    """The resampling that --pixel-size asks of a model with a recorded pixel size (None: the model's own)."""
    from mito.errors import ConfigError

    pixel_size = getattr(args, "pixel_size", None)
    if pixel_size is not None and settings.pixel_size is None:
        if not (getattr(args, "instances", False) or getattr(args, "labels_3d", False)):
            raise ConfigError(f"--pixel-size {pixel_size:g} has no effect: the model records no training pixel size "
                              "to resample to, and there are no --instances to measure in nm; leave it out")
        print(f"note: the model records no training pixel size: slices are not resampled, --pixel-size "
              f"{pixel_size:g} gives the measurements' units", file=sys.stderr)
    if pixel_size is None and settings.pixel_size is not None:  # right only for EM at the model's pixel size
        print(f"note: the model learned mitochondria at {settings.pixel_size:g} nm per pixel and these slices are "
              "taken to have that pixel size: give --pixel-size NM if they do not", file=sys.stderr)
    return settings.scale_for_pixel_size(pixel_size)


def add_debug_option(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NATIVE_LOG_LINE = re.compile(r"[IWEF]\d{4} ")  # absl/glog: severity letter, then MMDD


@contextlib.contextmanager
def native_log_filter(level: int):
    """Hold back what native code writes to stderr meanwhile, then write back all but the
    absl/glog lines below ``level`` (TF_CPP_MIN_LOG_LEVEL: 1 hides I, 2 also W, 3 also E)."""
    hidden = "IWE"[:max(level, 0)]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if hidden and (line.startswith(_ABSL_PREAMBLE) or (_NATIVE_LOG_LINE.match(line) and line[0] in hidden)):
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow, holding back the start-up lines that TF_CPP_MIN_LOG_LEVEL asks to hide.

    Abseil writes what is logged before its initialisation to stderr whatever the level
    (abseil/abseil-cpp#1718): on CPUs where TensorFlow turns oneDNN on, every script started
    with four such lines.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    with native_log_filter(level):
        import tensorflow  # noqa: F401


def run_cli(prog: str, run: Callable[[], int | None], debug: bool = False) -> int:
    """Run a script body: a user error (MitoError) becomes one line on stderr and exit code 2."""
    import_tensorflow_quietly()
    from mito.errors import MitoError

    # Notes and warnings on one line each, like the errors: "prog: warning: <file>: what happened".
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"

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
