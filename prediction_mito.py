#!/usr/bin/env python
"""Segment mitochondria in every EM image (PNG, TIFF, JPEG; any size) of a folder.

Writes one mask per image (same stem, PNG, 0/255) to --output and, with
--save-prob, the probability map (<stem>_prob.tif, float32). Images are
predicted in overlapping tiles and stitched without seams. Existing outputs
are kept (so a rerun finishes an interrupted folder) unless --overwrite.

Examples:
  python prediction_mito.py --demo
  python prediction_mito.py --input my_slices/ --model models/unet_mito.h5 --output my_masks/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cli import Parser, add_debug_option, add_inference_options, inference_setup, run_cli  # noqa: E402

PROG = "prediction_mito.py"
DEFAULT_MODEL = "models/unet_mito.h5"
DEMO = {"input": "dataset/demo/unlabeled", "model": "models/demo_unet.h5", "output": "predictions/demo"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--input", help="folder of EM images, or one image file")
    parser.add_argument("--demo", action="store_true", help=f"predict {DEMO['input']} with the demo model")
    parser.add_argument("--model", help=f"trained .h5 model (default: {DEFAULT_MODEL}; demo: {DEMO['model']})")
    parser.add_argument("--output", help="folder for the masks (default: predictions/<input folder name>)")
    parser.add_argument("--recursive", action="store_true", help="also process images in subfolders, except labels/ folders (mirrored in --output)")
    parser.add_argument("--save-prob", action="store_true", help="also write the probability map as <stem>_prob.tif")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping those images")
    add_inference_options(parser.add_argument_group("prediction"))
    add_debug_option(parser)
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


def predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    import data
    import unet

    source, output = Path(args.input), Path(args.output)
    base, images = input_images(source, args.recursive)
    if output.resolve() == base.resolve():
        raise data.DataError(f"{output}: refusing to write masks into the input folder; choose another --output")
    model, settings = unet.load_model(args.model)
    tile_size, overlap, threshold = inference_setup(args, settings)
    align = unet.UNetConfig.from_dict(settings["unet"]).alignment
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{output}: cannot create the output folder ({error.strerror})") from None
    if not os.access(output, os.W_OK):
        raise data.DataError(f"{output}: folder is not writable")
    data.remove_stale_partials(output, recursive=True)  # left by a run that was killed
    print(f"Model {args.model}: threshold {threshold:.2f}, tiles {tile_size}px with overlap {overlap}px")
    print(f"Predicting {len(images)} images from {source} into {output}")

    predict_fn = unet.make_predict_fn(model)
    done = skipped = 0
    failed = []
    for path in tqdm(images, desc="predict", unit="image", file=sys.stderr):
        target = output / path.relative_to(base).with_suffix(".png")
        prob_target = target.with_name(target.stem + "_prob.tif")
        wanted = [target] + ([prob_target] if args.save_prob else [])
        missing = [file for file in wanted if args.overwrite or not file.exists()]
        if not missing:
            skipped += 1
            continue
        try:
            image = data.normalize(data.read_image(path), settings["normalization"])
        except data.DataError as error:
            tqdm.write(f"{PROG}: skipped {error}", file=sys.stderr)
            failed.append(path)
            continue
        probability = data.predict_tiled(predict_fn, image, tile_size, overlap, align, args.batch_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        if prob_target in missing:
            data.write_image(prob_target, probability)
        if target in missing:
            data.write_image(target, np.where(probability >= threshold, 255, 0).astype(np.uint8))
        done += 1
    print(f"Wrote {done} masks to {output}" + (f"; kept {skipped} existing (use --overwrite to redo)" if skipped else ""))
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(images)} images could not be read: "
              + ", ".join(str(path) for path in failed), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
