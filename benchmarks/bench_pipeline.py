#!/usr/bin/env python
"""Does the input pipeline or the model bound training? Tiles per second of each, as JSON lines.

For each augmentation engine of training_mito.py --augment (keras: ImageDataGenerator per
sample; fast: FastTrainingTiles, vectorised TensorFlow ops; none: plain crops) it measures
the training tiles per second its tf.data pipeline delivers after a warm-up, and for the
cpu and gpu presets' U-Nets the tiles per second of training steps (train_on_batch on one
cached batch, so no input cost). Then one line per pairing says which side is slower:
'input-bound' when the pipeline delivers fewer tiles per second than the model trains on.

The model rates measured here are this machine's; on a GPU the step rate is far higher and
the pipeline (which runs on the CPU) must keep up with that.

Examples:
  python benchmarks/bench_pipeline.py                  # the real sample if present, else the demo
  python benchmarks/bench_pipeline.py --augmentation standard --tile-size 256 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mito.cli import Parser, positive_float, positive_int  # noqa: E402
import mito.augmentation  # noqa: E402
import mito.demo  # noqa: E402
import mito.fast_augmentation  # noqa: E402

SAMPLE = REPO / "dataset" / "em_mito_sample"  # python dataset/download_em_mito_sample.py
ENGINES = ("keras", "fast", "none")
MODELS = ("cpu", "gpu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="bench_pipeline.py", description=__doc__)
    parser.add_argument("--dataset", help="dataset root with train/ (default: dataset/em_mito_sample "
                                          "once built, else the demo in dataset/demo)")
    parser.add_argument("--augmentation", choices=["standard", "strong"], default="strong",
                        help="augmentation strength, as training_mito.py --augmentation (default: strong, "
                             "the heavier one, blur included)")
    parser.add_argument("--geometry", choices=["affine", "dihedral"], default="affine",
                        help="geometric changes, as training_mito.py --geometry (default: affine, the heavier one; "
                             "the cpu preset uses dihedral)")
    parser.add_argument("--tile-size", type=positive_int, default=256, help="training tile side (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="tiles per batch of the pipelines (default: 8); the models use their preset's")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="parallel batches of the pipelines, as training_mito.py --workers (default: 2)")
    parser.add_argument("--seconds", type=positive_float, default=10.0,
                        help="measuring time per pipeline and per model, after the warm-up (default: 10)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="pipelines to measure")
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS), help="presets whose U-Net to time")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test in seconds: 64 px tiles, batch 2, a 4-filter depth-2 U-Net for every preset")
    args = parser.parse_args(argv)
    if args.quick:
        args.tile_size, args.batch_size, args.seconds = 64, 2, min(args.seconds, 0.5)
    return args


def training_data(args):
    import data

    root = Path(args.dataset) if args.dataset else SAMPLE if (SAMPLE / "train").is_dir() else None
    if root is None:
        root = REPO / mito.demo.DEMO_ROOT
        if not mito.demo.demo_is_complete(root):
            mito.demo.make_demo_dataset(root)
    _, images, masks = data.load_split(root, "train")
    return root, [data.normalize(image) for image in images], masks


def rate(step, seconds: float, warmup: int = 2, minimum: int = 3) -> dict:
    """Call ``step()`` (which returns its item count) for ``seconds`` after ``warmup`` calls.

    Returns items per second of wall time and per second of this process's CPU time (all
    threads): the second changes less when other programs share the cores.
    """
    for _ in range(warmup):
        step()
    count, calls, started, cpu_started = 0, 0, time.perf_counter(), time.process_time()
    while calls < minimum or time.perf_counter() - started < seconds:
        count += step()
        calls += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"tiles_per_s": round(count / elapsed, 2), "tiles_per_cpu_s": round(count / cpu, 2), "calls": calls,
            "seconds": round(elapsed, 2)}


def pipeline_rate(engine: str, images, masks, args) -> dict:

    geometry, intensity = mito.augmentation.GEOMETRIES[args.geometry], mito.augmentation.INTENSITY_AUGMENTATIONS[args.augmentation]
    tiles_class = mito.fast_augmentation.FastTrainingTiles if engine == "fast" else mito.augmentation.TrainingTiles
    tiles = tiles_class(images, masks, args.tile_size, args.batch_size, steps_per_epoch=1000,
                        augment=engine != "none", seed=0, geometry=geometry, intensity=intensity)
    iterator = iter(tiles.dataset(0, 1000, args.workers))

    def step():
        x, _ = next(iterator)
        return int(x.shape[0])

    measured = rate(step, args.seconds)
    del iterator
    augmentation = "none" if engine == "none" else f"{args.augmentation}, {args.geometry}"
    return {"kind": "pipeline", "pipeline": engine, "augmentation": augmentation,
            "tile_size": args.tile_size, "batch_size": args.batch_size, "workers": args.workers, **measured}


def model_rate(preset_name: str, args) -> dict:
    import numpy as np
    import tensorflow as tf

    import unet
    from mito.presets import PRESETS

    preset = PRESETS[preset_name]
    config = unet.UNetConfig(depth=2 if args.quick else preset["depth"], base_filters=4 if args.quick else preset["filters"],
                             dropout=preset["dropout"], head_filters=preset["head_filters"],
                             batch_norm=preset["batch_norm"]).validate()
    batch = args.batch_size if args.quick else preset["batch_size"]
    on_cpu = not tf.config.list_physical_devices("GPU")
    model = unet.compile_unet(unet.build_unet(config), preset["learning_rate"], preset["loss"],
                              preset["foreground_weight"], jit_compile=on_cpu)  # as training_mito.py compiles
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, args.tile_size, args.tile_size, 1), np.float32))
    y = tf.constant((rng.random(x.shape) > 0.9).astype(np.float32))

    def step():
        model.train_on_batch(x, y)
        return batch

    measured = rate(step, args.seconds, warmup=1, minimum=2)  # the first step builds the graph
    return {"kind": "model", "model": preset_name, "filters": config.base_filters, "depth": config.depth,
            "batch_norm": config.batch_norm, "tile_size": args.tile_size, "batch_size": batch,
            "device": "CPU" if on_cpu else "GPU", "xla": bool(model.jit_compile), **measured}


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    root, images, masks = training_data(args)
    print(json.dumps({"kind": "setup", "dataset": str(root), "train_images": len(images),
                      "cpu_cores": os.cpu_count(), "tensorflow": tf.__version__}), flush=True)
    pipelines = []
    for engine in args.engines:
        pipelines.append(pipeline_rate(engine, images, masks, args))
        print(json.dumps(pipelines[-1]), flush=True)
    for preset_name in args.models:
        model = model_rate(preset_name, args)
        print(json.dumps(model), flush=True)
        for pipeline in pipelines:
            bound = "input-bound" if pipeline["tiles_per_s"] < model["tiles_per_s"] else "compute-bound"
            print(json.dumps({"kind": "verdict", "pipeline": pipeline["pipeline"], "model": preset_name,
                              "pipeline_tiles_per_s": pipeline["tiles_per_s"],
                              "model_tiles_per_s": model["tiles_per_s"], "verdict": bound}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
