#!/usr/bin/env python
"""Segment mitochondria in EM images (PNG, TIFF, JPEG; any size) or multi-page TIFF stacks.

Writes one mask per image (same stem, PNG, 0/255) to --output; a TIFF stack
gives a mask stack (<stem>.tif, one page per slice, for Fiji and napari).
Options add the probability map, labelled mitochondria with a measurements
table, and overlay pictures. Images are predicted in overlapping tiles and
stitched without seams. Existing outputs are kept (so a rerun finishes an
interrupted folder) unless --overwrite.

Examples:
  python prediction_mito.py --demo
  python prediction_mito.py --input my_slices/ --model models/unet_mito.h5 --output my_masks/
  python prediction_mito.py --input stack.tif --output stack_out/ --instances --pixel-size 10 --overlays
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cli import Parser, add_debug_option, add_inference_options, make_segmenter, positive_float, run_cli  # noqa: E402

PROG = "prediction_mito.py"
DEFAULT_MODEL = "models/unet_mito.h5"
DEMO = {"input": "dataset/demo/unlabeled", "model": "models/demo_unet.h5", "output": "predictions/demo"}


def shard_option(text: str) -> tuple[int, int]:
    """argparse type for --shard: 'I/N' with 1 <= I <= N."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, such as 2/8, got {text!r}")
    return int(index), int(count)


def shard_files(files: list, shard: tuple[int, int] | None) -> list:
    """The I-th of N shares of ``files`` (every N-th file from the I-th): over I = 1..N the
    shares cover each file exactly once and differ in size by at most one. ``files`` must be
    in the same order in every shard (list_images sorts them)."""
    if shard is None:
        return files
    index, count = shard
    return files[index - 1 :: count]


def build_parser() -> Parser:
    """The command line of prediction_mito.py."""
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--input", help="folder of EM images, or one image file or multi-page TIFF stack")
    parser.add_argument("--demo", action="store_true", help=f"predict {DEMO['input']} with the demo model")
    parser.add_argument("--model", help=f"trained .h5 model (default: {DEFAULT_MODEL}; demo: {DEMO['model']})")
    parser.add_argument("--output", help="folder for the masks (default: predictions/<input folder name>)")
    parser.add_argument("--recursive", action="store_true", help="also process images in subfolders, except labels/ folders (mirrored in --output)")
    parser.add_argument("--save-prob", action="store_true", help="also write the probability map as <stem>_prob.tif")
    parser.add_argument("--instances", action="store_true",
                        help="also write labelled mitochondria (<stem>_instances.tif, uint16) and measurements.csv "
                             "(one row per mitochondrion) and slices.csv (count, area fraction, mean size per slice)")
    parser.add_argument("--pixel-size", type=positive_float,
                        help="pixel size in nm: measurements also in nm and nm^2")
    parser.add_argument("--overlays", action="store_true",
                        help="also write <stem>_overlay.png (a stack: <stem>_overlay.tif, RGB): the mask outlined and "
                             "tinted on the EM image")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping those images")
    parser.add_argument("--shard", type=shard_option, metavar="I/N",
                        help="process only the I-th of N equal shares of the input files (I from 1 to N), e.g. one "
                             "share per job of a cluster array; all shards may write into the same --output")
    add_inference_options(parser.add_argument_group("prediction"))
    add_debug_option(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        for key, value in DEMO.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.input is None:
        parser.error("--input is required (or use --demo)")
    args.model = args.model or DEFAULT_MODEL
    if args.output is None:
        args.output = str(Path("predictions") / Path(args.input).resolve().name)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: predict(args), debug=args.debug)


def input_images(source: Path, recursive: bool) -> tuple[Path, list[Path]]:
    """(base folder, image files) for a folder or a single image file.

    A folder with no images of its own but images in subfolders (a dataset
    root like dataset/demo) is searched recursively. Recursive searches skip
    folders named 'labels': those hold masks, not EM slices.
    """
    from data import DataError, is_image_file, list_images

    if source.is_file():
        if not is_image_file(source):
            raise DataError(f"{source}: not a PNG, TIFF or JPEG file")
        return source.parent, [source]
    if not source.is_dir():
        raise DataError(f"{source}: input folder not found")
    images = list_images(source)
    if recursive or not images:
        images = [path for path in list_images(source, recursive=True)
                  if "labels" not in path.relative_to(source).parts[:-1]]
        if images and not recursive:
            print(f"No images directly in {source}: predicting the {len(images)} in its subfolders (labels/ skipped)")
    if not images:
        raise DataError(f"{source}: no PNG, TIFF or JPEG images found")
    return source, images


def output_paths(output: Path, relative: Path, stack: bool) -> dict[str, Path]:
    """Where each output of one input goes: same stem; a stack's outputs are stacks too."""
    stem = output / relative.with_suffix("")
    return {
        "mask": stem.with_suffix(".tif" if stack else ".png"),
        "prob": stem.with_name(stem.name + "_prob.tif"),
        "instances": stem.with_name(stem.name + "_instances.tif"),
        "overlay": stem.with_name(stem.name + ("_overlay.tif" if stack else "_overlay.png")),
    }


def predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    import data
    import unet

    source, output = Path(args.input), Path(args.output)
    base, images = input_images(source, args.recursive)
    found = len(images)
    images = shard_files(images, args.shard)
    if output.resolve() == base.resolve():
        raise data.DataError(f"{output}: refusing to write masks into the input folder; choose another --output")
    model, settings = unet.load_model(args.model)
    segmenter = make_segmenter(args, model, settings)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{output}: cannot create the output folder ({error.strerror})") from None
    if not os.access(output, os.W_OK):
        raise data.DataError(f"{output}: folder is not writable")
    data.remove_stale_partials(output, recursive=True)  # left by a run that was killed
    print(f"Model {args.model}: {segmenter.describe()}")
    shard = f" (shard {args.shard[0]}/{args.shard[1]} of {found} files)" if args.shard else ""
    print(f"Predicting {len(images)} files from {source} into {output}{shard}")

    wanted_kinds = ["mask"] + [kind for kind, on in (("prob", args.save_prob), ("instances", args.instances),
                                                      ("overlay", args.overlays)) if on]
    done = skipped = 0
    failed, measurements, summaries = [], [], []
    progress = tqdm(total=len(images), desc="predict", unit="file", file=sys.stderr)
    plans = []
    for path in images:
        relative = path.relative_to(base)
        try:
            count = data.count_slices(path)
        except data.DataError as error:
            tqdm.write(f"{PROG}: skipped {error}", file=sys.stderr)
            failed.append(path)
            progress.update()
            continue
        targets = output_paths(output, relative, count > 1)
        missing = {kind for kind in wanted_kinds if args.overwrite or not targets[kind].exists()}
        if not missing and not args.instances:
            skipped += 1
            progress.update()
            continue
        plans.append(_Plan(path, relative, count, targets, missing))

    # Three stages overlap: a thread reads and normalises the next slice, the model predicts this
    # one, and a thread thresholds, measures and writes the previous one (in order, one at a time).
    finisher = _Finisher(segmenter, settings, args, measurements, summaries)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for plan, index, item in data.prefetch(_read_slices(data, plan_list=plans, settings=settings)):
            if index < 0:  # the file could not be read: drop what was started for it
                if pending is not None:
                    pending.result()
                    pending = None
                finisher.discard(plan)
                tqdm.write(f"{PROG}: skipped {item}", file=sys.stderr)
                failed.append(plan.path)
                progress.update()
                continue
            image, mask = item
            probability = segmenter.probability(image) if plan.predicts else None
            if pending is not None:
                pending.result()  # at most one slice waits to be written: memory stays bounded
            pending = writer.submit(finisher.add, plan, index, image, probability, mask)  # closes the file at its end
            if index == plan.count - 1:
                done += bool(plan.missing)
                skipped += not plan.missing
                progress.update()
        if pending is not None:
            pending.result()
    progress.close()
    if args.instances:  # each shard its own tables, so that no two shards write one file
        suffix = f".shard-{args.shard[0]}-of-{args.shard[1]}.csv" if args.shard else ".csv"
        tables = output / ("measurements" + suffix), output / ("slices" + suffix)
        _write_csv(data, tables[0], measurements)
        _write_csv(data, tables[1], summaries)
        print(f"Measured {len(measurements)} mitochondria in {len(summaries)} slices: {tables[0]}, {tables[1]}")
    print(f"Wrote outputs for {done} files to {output}"
          + (f"; kept {skipped} existing (use --overwrite to redo)" if skipped else ""))
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(images)} files could not be read: "
              + ", ".join(str(path) for path in failed), file=sys.stderr)
        return 2
    return 0


@dataclasses.dataclass
class _Plan:
    """One input file: where its outputs go and which of them to write."""

    path: Path
    relative: Path
    count: int  # slices
    targets: dict
    missing: set

    @property
    def predicts(self) -> bool:
        return bool(self.missing & {"mask", "prob"})

    @property
    def reads_image(self) -> bool:
        return self.predicts or "overlay" in self.missing


def _read_slices(data, plan_list, settings):
    """(plan, index, (normalised slice or None, existing mask or None)) for every slice, read one at a time.

    A file that cannot be read gives (plan, -1, DataError) instead, after any slices already read.
    """
    from itertools import repeat

    for plan in plan_list:
        try:
            images = data.iter_slices(plan.path) if plan.reads_image else repeat(None)
            masks = data.iter_slices(plan.targets["mask"]) if not plan.predicts else repeat(None)
            for index, image, mask in zip(range(plan.count), images, masks):
                image = None if image is None else data.normalize(image, settings["normalization"])
                yield plan, index, (image, None if mask is None else (mask > 0).astype("uint8"))
        except data.DataError as error:
            yield plan, -1, error


class _Finisher:
    """Thresholds, measures and writes each predicted slice (stacks slice by slice), then closes each file."""

    def __init__(self, segmenter, settings, args, measurements, summaries):
        self.segmenter, self.settings, self.args = segmenter, settings, args
        self.measurements, self.summaries, self.writers = measurements, summaries, {}

    def add(self, plan, index, image, probability, mask):
        import data
        from metrics import label_instances, measure_mitochondria, slice_summary

        if index == 0:
            plan.targets["mask"].parent.mkdir(parents=True, exist_ok=True)
            self.writers[plan.path] = {kind: data.StackWriter(plan.targets[kind], plan.count, plan.count > 1)
                                       for kind in plan.missing}
        writers = self.writers[plan.path]
        if probability is not None:
            mask = self.segmenter.mask(probability).astype("uint8")
        instances = label_instances(mask) if self.args.instances else None
        pages = {
            "prob": lambda: probability,
            "mask": lambda: mask * 255,
            "instances": lambda: instances,
            "overlay": lambda: data.overlay(image, [(mask, (255, 0, 255))], tint=mask),
        }
        for kind, writer in writers.items():
            writer.add(pages[kind]())
        if self.args.instances:
            key = {"image": str(plan.relative), "slice": index}
            self.summaries.append(key | slice_summary(instances, self.args.pixel_size))
            self.measurements.extend(key | row for row in measure_mitochondria(instances, self.args.pixel_size))
        if index == plan.count - 1:
            self.close(plan)

    def close(self, plan):
        writers = self.writers.pop(plan.path, {})
        for kind in ("prob", "instances", "overlay", "mask"):  # the mask last: it marks the file as done
            if kind in writers:
                writers[kind].close()

    def discard(self, plan):
        for writer in self.writers.pop(plan.path, {}).values():
            writer.discard()


def _write_csv(data, path: Path, rows: list[dict]) -> None:
    """Rows with the union of their keys as columns, written atomically."""
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["image", "slice"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    data.atomic_write(path, lambda temporary: temporary.write_text(table.getvalue()))


if __name__ == "__main__":
    sys.exit(main())
