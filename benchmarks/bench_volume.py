#!/usr/bin/env python
"""Zarr volumes on Dask: the same masks as whole-slice prediction, scaling with workers, overhead, memory.

Prints one JSON line per measurement (and writes them to --output if given), with a randomly initialised U-Net
of the cpu preset's architecture and scale (filters 8, depth 4, batch norm, slices at half scale) on a
synthetic uint8 zarr volume:

- ``equal``: masks of ``prediction_mito.py --input volume.zarr`` on Dask against today's path, the same
  command on the volume written as a TIFF stack, pixels that differ;
- ``throughput``: megapixels per second of each whole command (start-up included: use a volume large enough
  for it to be small): today's path in one process with every core, the Dask path with 1 worker of one
  TensorFlow thread (the child pinned to one core) and with one single-thread worker per core; the speed-up
  of N workers over 1 and their rate against today's;
- ``memory`` (with --memory-side): peak resident memory of every process of the command (polled every 0.2 s)
  while a volume of 2 slices of that side is predicted by one single-thread worker per core.

Both paths use the same --precision (auto by default, as a user runs them). Slices of more than 4 million
pixels are normalised from sampled percentiles on the Dask path (docs/volumes.md), which can move pixels near
the threshold: ``equal`` on slices of at most 2048 px measures the rest.

  python benchmarks/bench_volume.py                       # 8 slices of 8192 px, then 2 slices of 20,000 px
  python benchmarks/bench_volume.py --quick               # a tiny volume: checks the benchmark itself
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mito.cli import Parser, positive_int, run_cli  # noqa: E402

PROG = "bench_volume.py"


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--slices", type=positive_int, default=8, help="slices of the throughput volume")
    parser.add_argument("--side", type=positive_int, default=8192, help="side of its slices (px)")
    parser.add_argument("--memory-side", type=int, default=20000,
                        help="side of the 2 slices of the memory test (0: skip it)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="--precision of both paths (default: auto, as a user runs them)")
    parser.add_argument("--quick", action="store_true", help="a tiny volume, no memory test: seconds")
    parser.add_argument("--output", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.side, args.memory_side = 2, 256, 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


def cpu_model(folder: Path) -> Path:
    """A random U-Net with the cpu preset's architecture and scale, saved with default settings."""
    import tensorflow as tf

    import mito.model_files
    import unet
    from mito.presets import PRESETS

    recipe = PRESETS["cpu"]
    config = unet.UNetConfig(depth=recipe["depth"], base_filters=recipe["filters"], dropout=recipe["dropout"],
                             batch_norm=recipe["batch_norm"], head_filters=recipe["head_filters"])
    tf.keras.utils.set_random_seed(0)
    path = folder / "cpu_random.h5"
    mito.model_files.save_model(unet.build_unet(config), path,
                                mito.model_files.default_settings(config, scale=recipe["scale"]))
    return path


def write_volume(path: Path, slices: int, side: int) -> None:
    """A synthetic uint8 volume: dark blobs on a textured background, chunks of 1 x 1024 x 1024, written slice
    by slice (a 20,000 px slice is built in bands so that memory stays small)."""
    import numpy as np
    import zarr

    array = zarr.create_array(str(path), shape=(slices, side, side), chunks=(1, min(side, 1024), min(side, 1024)),
                              dtype="uint8", zarr_format=2)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024]
    pattern = (128 + 40 * np.sin(yy / 23.0) * np.cos(xx / 31.0)).astype(np.float32)
    for z in range(slices):
        for y in range(0, side, 1024):
            band = np.tile(pattern, (1, -(-side // 1024)))[: min(1024, side - y), :side]
            noise = rng.normal(0, 12, band.shape).astype(np.float32)
            array[z, y:y + band.shape[0]] = np.clip(band + noise, 0, 255).astype(np.uint8)


def write_stack(volume: Path, path: Path) -> None:
    """The same volume as a multi-page TIFF, the input of today's path (pages read one at a time)."""
    import tifffile
    import zarr

    array = zarr.open_array(str(volume), mode="r")
    with tifffile.TiffWriter(path) as stack:
        for z in range(array.shape[0]):
            stack.write(array[z], contiguous=True)


def predict_cli(source: Path, model: Path, output: Path, workers: int | None, cores: str | None = None,
                precision: str = "auto"):
    """(wall seconds, {worker pid: peak RSS MB}) of prediction_mito.py on ``source`` in a child process, with
    ``workers`` Dask workers (None: today's single process), pinned to ``cores`` (a taskset list) if given."""
    import psutil

    command = [sys.executable, str(REPO / "prediction_mito.py"), "--input", str(source), "--model", str(model),
               "--output", str(output), "--overwrite", "--precision", precision,
               *(["--workers", str(workers)] if workers else [])]
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {}
    parent = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            for process in [parent, *parent.children(recursive=True)]:
                peaks[process.pid] = max(peaks.get(process.pid, 0), process.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise RuntimeError(f"prediction_mito.py failed: {child.stderr.read().strip().splitlines()[-1:]}")
    return seconds, peaks


def run(args) -> int:
    import numpy as np
    import tifffile
    import zarr

    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = cpu_model(work)
        volume = work / "volume.zarr"
        write_volume(volume, args.slices, args.side)
        write_stack(volume, work / "volume.tif")
        megapixels = args.slices * args.side**2 / 1e6
        today_seconds, _ = predict_cli(work / "volume.tif", model, work / "today", None, None, args.precision)
        one_seconds, _ = predict_cli(volume, model, work / "one", 1, "0", args.precision)
        many_seconds, _ = predict_cli(volume, model, work / "many", cores, None, args.precision)
        today_masks = tifffile.imread(work / "today" / "volume.tif")
        dask_masks = zarr.open_group(str(work / "many" / "volume.zarr"), mode="r")["0"][:]
        emit({"kind": "equal", "slices": args.slices, "side": args.side, "precision": args.precision,
              "differing_pixels": int(np.count_nonzero(dask_masks != today_masks))})
        emit({"kind": "throughput", "cores": cores, "megapixels": megapixels,
              "today_mpx_s": megapixels / today_seconds, "one_worker_one_thread_mpx_s": megapixels / one_seconds,
              f"{cores}_workers_one_thread_mpx_s": megapixels / many_seconds,
              "speedup_over_one_worker": one_seconds / many_seconds, "rate_vs_today": today_seconds / many_seconds,
              "note": "wall time of each whole command, start-up included: today's path is prediction_mito.py "
                      "on the volume as a TIFF stack with every core, the Dask path starts its cluster and loads "
                      "the model in each worker"})
        if args.memory_side:
            big = work / "big.zarr"
            write_volume(big, 2, args.memory_side)
            seconds, peaks = predict_cli(big, model, work / "big_out", cores, None, args.precision)
            emit({"kind": "memory", "slices": 2, "side": args.memory_side, "workers": cores, "seconds": seconds,
                  "input_gb_float32": round(2 * args.memory_side**2 * 4 / 1e9, 2),
                  "peak_rss_mb_per_process": sorted(round(peak) for peak in peaks.values())})
    if args.output:
        Path(args.output).write_text("".join(json.dumps(record) + "\n" for record in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
