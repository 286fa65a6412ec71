#!/usr/bin/env python
"""Segment mitochondria in EM images (PNG, TIFF, JPEG; any size), multi-page TIFF stacks or zarr volumes.

Writes one mask per image (same stem, PNG, 0/255) to --output; a TIFF stack
gives a mask stack (<stem>.tif, one page per slice, for Fiji and napari).
Options add the probability map, labelled mitochondria with a measurements
table, and overlay pictures. Images are predicted in overlapping tiles and
stitched without seams. Existing outputs are kept (so a rerun finishes an
interrupted folder) unless --overwrite.

A zarr volume (an OME-Zarr image or a plain zarr array, 2D or z-y-x) is
predicted in blocks on Dask, by local worker processes (--workers) or an
existing cluster (--scheduler), into an OME-Zarr mask with a pyramid
(<stem>.zarr); a rerun of the same command finishes an interrupted volume.

Examples:
  python prediction_mito.py --demo
  python prediction_mito.py --input my_slices/ --model models/unet_mito.h5 --output my_masks/
  python prediction_mito.py --input stack.tif --output stack_out/ --instances --pixel-size 10 --overlays
  python prediction_mito.py --input volume.ome.zarr --output volume_out/ --workers 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mito.cli import (Parser, add_debug_option, add_inference_options, fill_unset, inference_options,  # noqa: E402
                      positive_int, run_cli, shard_option)

PROG = "prediction_mito.py"
DEFAULT_MODEL = "models/unet_mito.h5"
DEMO = {"input": "dataset/demo/unlabeled", "model": "models/demo_unet.h5", "output": "predictions/demo"}
VOLUME_ONLY = ("array", "workers", "scheduler", "block_size", "prob_dtype", "labels_3d")


def build_parser() -> Parser:
    """The command line of prediction_mito.py."""
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--input", help="folder of EM images, one image file or multi-page TIFF stack, or a zarr volume")
    parser.add_argument("--demo", action="store_true", help=f"predict {DEMO['input']} with the demo model")
    parser.add_argument("--model", help=f"trained .h5 model (default: {DEFAULT_MODEL}; demo: {DEMO['model']})")
    parser.add_argument("--output", help="folder for the masks (default: predictions/<input folder name>)")
    parser.add_argument("--recursive", action="store_true", help="also process images in subfolders, except labels/ folders (mirrored in --output)")
    parser.add_argument("--save-prob", action="store_true", help="also write the probability map as <stem>_prob.tif")
    parser.add_argument("--instances", action="store_true",
                        help="also write labelled mitochondria (<stem>_instances.tif, uint16) and measurements.csv "
                             "(one row per mitochondrion) and slices.csv (count, area fraction, mean size per slice)")
    parser.add_argument("--overlays", action="store_true",
                        help="also write <stem>_overlay.png (a stack: <stem>_overlay.tif, RGB): the mask outlined and "
                             "tinted on the EM image")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping those images")
    parser.add_argument("--shard", type=shard_option, metavar="I/N",
                        help="process only the I-th of N equal shares of the input files (I from 1 to N), e.g. one "
                             "share per job of a cluster array; all shards may write into the same --output")
    add_inference_options(parser.add_argument_group("prediction"))
    add_volume_options(parser.add_argument_group("zarr volumes (docs/volumes.md)"))
    add_debug_option(parser)
    return parser


def add_volume_options(group) -> None:
    group.add_argument("--array", metavar="PATH",
                       help="the array inside a zarr group that holds several (e.g. 'raw' or a level such as 's0'; "
                            "default: an OME-Zarr image's full resolution, or the group's only array)")
    group.add_argument("--workers", type=positive_int, default=1,
                       help="local Dask worker processes; each gets cores/workers TensorFlow threads (default: 1)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="use the Dask cluster of this scheduler (e.g. tcp://node17:8786) instead of local workers")
    group.add_argument("--block-size", type=positive_int, default=2048,
                       help="side in y and x of the blocks given to workers, rounded to the output chunks and the "
                            "network's pooling grid; memory per worker grows with its square (default: 2048)")
    group.add_argument("--prob-dtype", choices=("uint8", "float16"), default="uint8",
                       help="type of the --save-prob volume: uint8 is 255 x probability (a quarter of float32; "
                            "default: uint8)")
    group.add_argument("--labels-3d", action="store_true",
                       help="also label 3D connected components of the mask (labels/objects3d) and measure them "
                            "in <stem>_objects3d.csv")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", PROG, *(sys.argv[1:] if argv is None else argv)])
    if args.demo:
        fill_unset(args, DEMO)
    if args.input is None:
        parser.error("--input is required (or use --demo)")
    args.model = args.model or DEFAULT_MODEL
    from mito.volume import is_zarr

    args.volume = is_zarr(args.input)
    if args.output is None:
        name = Path(args.input).resolve().name
        name = name.removesuffix(".zarr").removesuffix(".ome") if args.volume else name
        args.output = str(Path("predictions") / name)
    if args.volume:
        unsupported = [f"--{name}" for name in ("shard", "recursive", "overlays") if getattr(args, name)]
        if unsupported:
            parser.error(f"{', '.join(unsupported)} work on files and folders; a zarr volume is split among Dask "
                         "workers instead (--workers, --scheduler)")
        if args.adapt_batchnorm:
            parser.error("--adapt-batchnorm works on image files and TIFF stacks, not yet on zarr volumes")
    else:
        volume_only = [f"--{name.replace('_', '-')}" for name in VOLUME_ONLY
                       if getattr(args, name) != parser.get_default(name)]
        if volume_only:
            parser.error(f"{', '.join(volume_only)} apply to a zarr volume input, and {args.input} is not one")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: predict_volume(args) if args.volume else predict(args), debug=args.debug)


def predict_volume(args: argparse.Namespace) -> int:
    """A zarr volume, blockwise on Dask (mito/volume_run.py); the model is loaded here once to check it and
    once per worker."""
    from mito.model_files import load_model, resolve_model_path
    from mito.segmenter import Segmenter
    from mito.volume_model import loader
    from mito.volume_run import predict_volume as run

    model, settings = load_model(args.model)
    if args.pixel_size is None and settings.pixel_size:  # a model that knows its pixel size, a volume that says its
        from mito.volume import open_volume, pixel_size_nm

        args.pixel_size = pixel_size_nm(open_volume(args.input, args.array))
        if args.pixel_size:
            print(f"Pixel size  {args.pixel_size:g} nm, from {args.input}'s OME metadata")
    options = inference_options(args, settings)
    segmenter = Segmenter(model, settings, **options)
    options["precision"] = segmenter.precision  # chosen here once: every worker computes alike
    print(f"Model {args.model}: {segmenter.describe()}")
    threads = None if args.scheduler else max(1, len(os.sched_getaffinity(0)) // args.workers)
    # An absolute path: workers of an existing cluster may run in another folder (a shared file system).
    model_path = resolve_model_path(args.model).resolve()
    return run(args, segmenter, loader(str(model_path), options, threads))


def predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import data
    from mito.files import remove_stale_partials
    from mito.model_files import at_scale, load_model
    from mito.prediction import input_images, shard_files
    from mito.segmenter import Segmenter

    source, output = Path(args.input), Path(args.output)
    base, images = input_images(source, args.recursive)
    found = len(images)
    every_image, images = images, shard_files(images, args.shard)
    if output.resolve() == base.resolve():
        raise data.DataError(f"{output}: refusing to write masks into the input folder; choose another --output")
    model, settings = load_model(args.model)
    options = inference_options(args, settings)
    adaptation = None
    if args.adapt_batchnorm:  # on slices of the whole input, so that every shard adapts alike
        from mito.adaptation import adapt_to_input

        adaptation = adapt_to_input(model, at_scale(settings, options["scale"]), every_image)
    segmenter = Segmenter(model, settings, **options)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{output}: cannot create the output folder ({error.strerror})") from None
    if not os.access(output, os.W_OK):
        raise data.DataError(f"{output}: folder is not writable")
    remove_stale_partials(output, recursive=True)  # left by a run that was killed
    print(f"Model {args.model}: {segmenter.describe()}")
    shard = f" (shard {args.shard[0]}/{args.shard[1]} of {found} files)" if args.shard else ""
    print(f"Predicting {len(images)} files from {source} into {output}{shard}")

    progress = tqdm(total=len(images), desc="predict", unit="file", file=sys.stderr)
    plans, skipped, failed = plan_outputs(args, base, images, output, progress)
    done, kept, measurements, summaries = run_pipeline(args, segmenter, plans, progress, failed, len(images) > 1)
    progress.close()
    skipped += kept
    if args.instances:
        write_tables(args, output, measurements, summaries)
    if done:  # what the masks in this folder were made with (a rerun that only kept outputs leaves it)
        write_run_record(output, args, segmenter, adaptation)
    print(f"Wrote outputs for {done} files to {output}"
          + (f"; kept {skipped} existing (use --overwrite to redo)" if skipped else ""))
    if len(failed) == 1 and len(images) == 1:  # one file asked for: its reason is the one line
        print(f"{PROG}: error: {failed[0]}", file=sys.stderr)
    elif failed:
        print(f"{PROG}: error: {len(failed)} of {len(images)} files could not be read: "
              + ", ".join(str(error).split(": ")[0] for error in failed), file=sys.stderr)
    return 2 if failed else 0


def plan_outputs(args, base: Path, images: list[Path], output: Path, progress):
    """(plans of the files with outputs to write, files whose outputs are all there, unreadable files)."""
    from tqdm import tqdm

    import data
    from mito.prediction import Plan, output_paths

    wanted_kinds = ["mask"] + [kind for kind, on in (("prob", args.save_prob), ("instances", args.instances),
                                                      ("overlay", args.overlays)) if on]
    plans, skipped, failed = [], 0, []
    for path in images:
        relative = path.relative_to(base)
        try:
            count = data.count_slices(path)
        except data.DataError as error:
            if len(images) > 1:
                tqdm.write(f"{PROG}: skipped {error}", file=sys.stderr)
            failed.append(error)
            progress.update()
            continue
        targets = output_paths(output, relative, count > 1)
        missing = {kind for kind in wanted_kinds if args.overwrite or not targets[kind].exists()}
        if not missing and not args.instances:
            skipped += 1
            progress.update()
            continue
        plans.append(Plan(path, relative, count, targets, missing))
    return plans, skipped, failed


def run_pipeline(args, segmenter, plans, progress, failed: list, report_each: bool = True):
    """Three overlapping stages: a thread reads and normalises the next slice, the model predicts this
    one, and a thread thresholds, measures and writes the previous one (in order, one at a time).
    Returns (files written, files whose outputs were all there, measurements, per-slice summaries)."""
    from tqdm import tqdm

    from mito.prediction import Finisher, read_slices
    from mito.streaming import prefetch

    done = kept = 0
    measurements, summaries = [], []
    finisher = Finisher(segmenter, args, measurements, summaries)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for plan, index, item in prefetch(read_slices(plans, segmenter)):
            if index < 0:  # the file could not be read: drop what was started for it
                if pending is not None:
                    pending.result()
                    pending = None
                finisher.discard(plan)
                if report_each:
                    tqdm.write(f"{PROG}: skipped {item}", file=sys.stderr)
                failed.append(item)
                progress.update()
                continue
            image, mask = item
            probability = segmenter.probability_of_normalized(image) if plan.predicts else None
            if pending is not None:
                pending.result()  # at most one slice waits to be written: memory stays bounded
            pending = writer.submit(finisher.add, plan, index, image, probability, mask)  # closes the file at its end
            if index == plan.count - 1:
                done += bool(plan.missing)
                kept += not plan.missing
                progress.update()
        if pending is not None:
            pending.result()
    return done, kept, measurements, summaries


def write_run_record(output: Path, args, segmenter, adaptation: dict | None) -> None:
    """prediction.json (a shard's: prediction.shard-I-of-N.json): how the outputs in ``output`` were made."""
    from mito.files import write_json
    from mito.model_files import resolve_model_path

    suffix = f".shard-{args.shard[0]}-of-{args.shard[1]}.json" if args.shard else ".json"
    write_json(output / ("prediction" + suffix), {
        "command": args.command,
        "model": str(resolve_model_path(args.model).resolve()),
        "input": str(Path(args.input).resolve()),
        "threshold": segmenter.threshold, "postprocess": segmenter.postprocess, "scale": segmenter.scale,
        "pixel_size": args.pixel_size, "model_pixel_size": segmenter.settings.pixel_size,
        "tile_size": segmenter.tile_size, "overlap": segmenter.overlap, "batch_size": segmenter.batch_size,
        "precision": segmenter.precision, "tta": segmenter.tta, "adaptation": adaptation,
    })


def write_tables(args, output: Path, measurements: list, summaries: list) -> None:
    """measurements.csv and slices.csv; each shard its own, so that no two shards write one file."""
    from mito.prediction import write_csv

    suffix = f".shard-{args.shard[0]}-of-{args.shard[1]}.csv" if args.shard else ".csv"
    tables = output / ("measurements" + suffix), output / ("slices" + suffix)
    write_csv(tables[0], measurements)
    write_csv(tables[1], summaries)
    print(f"Measured {len(measurements)} mitochondria in {len(summaries)} slices: {tables[0]}, {tables[1]}")


if __name__ == "__main__":
    sys.exit(main())
