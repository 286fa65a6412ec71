#!/usr/bin/env python
"""How fast prediction runs, against this machine's arithmetic ceiling, and how much memory it needs.

Prints one JSON line per measurement (and writes them to --output if given):

- ``ceiling``: the machine's float32 (and bfloat16) matmul rate, timed in this
  run with a large ``tf.linalg.matmul``; the yardstick for the rest.
- ``predict``, one per configuration (base filters x precision), with randomly
  initialised U-Nets (unet.build_unet, depth 4) on synthetic EM slices:
  tiled prediction (``predict_tiled``) in megapixels per second and in
  GFLOP/s against the ceiling; the same slices through ``prediction_mito.py``
  (reading, normalising, thresholding and writing overlapped with the
  model); the time of one whole-image call that gives the same result
  (``predict_whole``: one bare call on the slice); and a naive tile loop, one
  ``model.predict`` call per tile, timed on a few of its tiles and
  extrapolated to the slice.
- ``memory``: peak resident memory (the child's own VmHWM) and wall time of
  ``prediction_mito.py --save-prob`` on the folder of small slices, one large
  slice and a multi-page TIFF stack of large slices; and the time per
  megapixel of tiled prediction on the large slice against the small ones.

FLOPs per megapixel count every convolution (2 x kernel height x width x
input x output channels per output pixel, at the layer's resolution);
pooling, upsampling, concatenation and activations are left out (< 1 %).

  python benchmarks/bench_predict.py            # the README's figures (minutes on 2 cores)
  python benchmarks/bench_predict.py --quick    # a tiny model, seconds: checks the benchmark itself
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

from mito.stack_writer import StackWriter  # noqa: E402
from mito.cli import Parser, positive_int, run_cli, tile_size  # noqa: E402
import mito.demo  # noqa: E402
import mito.files  # noqa: E402
import mito.model_files  # noqa: E402
import mito.segmenter  # noqa: E402
import mito.tiling  # noqa: E402

PROG = "bench_predict.py"


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--filters", type=positive_int, nargs="*",
                        help="base filters to time; none: only the memory test (default: 16 32 64; quick: 4)")
    parser.add_argument("--precision", nargs="+", choices=("float32", "bfloat16", "float16"),
                        help="precisions to time (default: float32, plus bfloat16 where the CPU has it in hardware "
                             "(AVX512-BF16/AMX) or on a GPU, plus float16 on a GPU)")
    parser.add_argument("--size", type=positive_int, default=1024, help="side of the synthetic slices")
    parser.add_argument("--slices", type=positive_int, default=2, help="slices in the folder (2 or more)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed passes over the slices, after an untimed warm-up pass; each figure is their "
                             "median (default: %(default)s)")
    parser.add_argument("--tile-size", type=tile_size,
                        help="tile side, or 'auto' (default: the model's: sized to memory)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="tiles per batch")
    parser.add_argument("--naive-tile", type=positive_int, default=256, help="tile side of the naive loop")
    parser.add_argument("--naive-stride", type=positive_int, default=128,
                        help="step of the naive loop (half its tile: overlapping tiles averaged, so no seams)")
    parser.add_argument("--naive-tiles", type=positive_int, default=6, help="naive tiles actually timed")
    parser.add_argument("--sizes", type=positive_int, nargs="*",
                        help="sides of the large slices of the memory test; none: skip it (default: 8192; quick: 512)")
    parser.add_argument("--large-repeats", type=positive_int,
                        help="timed passes over each large slice, after its tile shape was warmed up; the figure "
                             "is their median, so that the first pass's page faults on the slice's buffers do not "
                             "count (default: 3, quick: 1; a pass of 8192 px takes 25 s with 16 filters, 6 "
                             "min with 64)")
    parser.add_argument("--stack-pages", type=positive_int, default=2, help="pages of the large TIFF stack")
    parser.add_argument("--memory-filters", type=positive_int, default=16, help="base filters of the memory test")
    parser.add_argument("--memory-precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="arithmetic of the memory test (default: auto, what prediction_mito.py runs)")
    parser.add_argument("--no-memory-runs", action="store_true",
                        help="time the large slice against the small ones in this process only, without the "
                             "prediction_mito.py runs that measure peak memory (minutes each for large models)")
    parser.add_argument("--quick", action="store_true",
                        help="a depth-2 U-Net with 4 filters on 128-px slices, 512-px memory test: checks, not figures")
    parser.add_argument("--output", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.slices = 128, 2
        args.naive_tile, args.naive_stride, args.naive_tiles, args.memory_filters = 64, 32, 3, 4
        # a tiny model's tiles sized to memory would hold the 512 px slice whole: cut it as a large one is
        args.tile_size = args.tile_size or 256
    args.large_repeats = args.large_repeats or (1 if args.quick else 3)
    if args.filters is None:
        args.filters = [4] if args.quick else [16, 32, 64]
    if args.sizes is None:
        args.sizes = [512] if args.quick else [8192]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


def _config(filters: int, quick: bool):
    import unet

    return unet.UNetConfig(depth=2 if quick else 4, base_filters=filters, dropout=0.0)


def conv_flops_per_megapixel(model) -> float:
    """Multiply-adds x 2 of every Conv2D per million input pixels (shapes from a 64 x 64 probe)."""
    import numpy as np
    import tensorflow as tf

    convs = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    probe = tf.keras.Model(model.inputs, [layer.output for layer in convs])
    outputs = probe([np.zeros((1, 64, 64, 1), np.float32)])
    flops = 0.0
    for layer, output in zip(convs, outputs):
        kernel_y, kernel_x = layer.kernel_size
        per_pixel = 2 * kernel_y * kernel_x * layer.kernel.shape[-2] * layer.filters
        flops += per_pixel * output.shape[1] * output.shape[2] / (64 * 64)
    return flops * 1e6


def matmul_gflops(dtype: str, side: int = 2048, seconds: float = 2.0) -> float:
    """The best rate of a side x side matmul over ``seconds`` (GFLOP/s)."""
    import tensorflow as tf

    a = tf.random.uniform((side, side), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    matmul = tf.function(lambda: tf.linalg.matmul(a, b), autograph=False)
    matmul().numpy()
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        tick = time.perf_counter()
        matmul().numpy()
        best = min(best, time.perf_counter() - tick)
    return 2 * side**3 / best / 1e9


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def write_slices(folder: Path, count: int, side: int) -> list:
    """``count`` synthetic EM slices of side x side as 8-bit PNGs; returns them as arrays."""
    import numpy as np

    import data

    folder.mkdir(parents=True, exist_ok=True)
    base_side = min(side, 1024)
    base = mito.demo.synthetic_em_slice(np.random.default_rng(0), (base_side, base_side))[0]
    slices = []
    for index in range(count):
        big = np.tile(base, (-(-side // base_side),) * 2)[:side, :side]
        slices.append(np.roll(big, 97 * index, axis=(0, 1)))
        data.write_image(folder / f"{index:04d}.png", slices[-1])
    return slices


def timed(function, *arguments):
    started = time.perf_counter()
    result = function(*arguments)
    return time.perf_counter() - started, result


def steady_seconds(function, repeats: int) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls of ``function()``, its result), after one untimed call: the first
    call of a shape builds its kernels, a cost that no steady-state figure may carry."""
    import statistics

    result = function()
    seconds = []
    for _ in range(repeats):
        elapsed, result = timed(function)
        seconds.append(elapsed)
    return statistics.median(seconds), result


def naive_loop_seconds(model, image, tile: int, stride: int, timed_tiles: int) -> tuple[float, int]:
    """Seconds per slice of one ``model.predict`` call per tile, sliding ``tile`` by ``stride``.

    Times the first ``timed_tiles`` tiles (after one warm-up call) and
    extrapolates to all the slice's tiles; returns (seconds, tiles per slice).
    """
    import numpy as np

    starts = [range(0, max(1, length - tile + stride), stride) for length in image.shape]
    corners = [(y, x) for y in starts[0] for x in starts[1]]
    padded = np.pad(image, [(0, tile), (0, tile)], mode="reflect")
    model.predict(padded[None, :tile, :tile, None], verbose=0)
    sample = corners[:timed_tiles]
    started = time.perf_counter()
    for y, x in sample:
        model.predict(padded[None, y : y + tile, x : x + tile, None], verbose=0)
    return (time.perf_counter() - started) / len(sample) * len(corners), len(corners)


# Runs a script and reports its own peak resident memory (VmHWM) on stderr at exit. Read from inside the
# child: the ru_maxrss that wait4 returns starts from the parent's size at fork, which here is large.
_PEAK_REPORTER = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("bench_predict VmHWM " + line.split()[1] + "\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def measure_child(script_and_arguments: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of ``python script arguments...`` in a child process."""
    command = [sys.executable, "-c", _PEAK_REPORTER, *script_and_arguments]
    started = time.perf_counter()
    child = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - started
    peaks = [line.split()[-1] for line in child.stderr.splitlines() if line.startswith("bench_predict VmHWM")]
    if child.returncode or not peaks:
        raise RuntimeError(f"{' '.join(script_and_arguments)} failed: {child.stderr.strip().splitlines()[-1:]}")
    return seconds, int(peaks[-1]) / 1024  # kB


def save_random_model(config, folder: Path, name: str) -> Path:
    import tensorflow as tf

    import unet

    tf.keras.utils.set_random_seed(0)
    model = unet.build_unet(config)
    path = folder / f"{name}.h5"
    mito.model_files.save_model(model, path, mito.model_files.default_settings(config))
    return path


def steady_pipeline_rate(args, model_path: Path, precision: str, folder: Path, work: Path, megapixels: float) -> float:
    """Megapixels per second of prediction_mito.py as users run it, in steady state: a folder of N slices
    minus a folder of its first slice, which cancels the start-up (process, imports, model loading, first
    call) and the first read and last write that nothing can overlap. ``megapixels``: those of slices 2..N."""
    extra = ["--precision", precision, "--batch-size", str(args.batch_size), "--save-prob"]
    extra += ["--tile-size", str(args.tile_size)] if args.tile_size else []

    def predict(source, output):
        command = [sys.executable, str(REPO / "prediction_mito.py"), "--input", str(source), "--model",
                   str(model_path), "--output", str(output), "--overwrite", *extra]
        result = subprocess.run(command, capture_output=True, text=True)  # stdout carries only our JSON lines
        if result.returncode:
            raise RuntimeError(f"prediction_mito.py failed in the benchmark: {result.stderr[-2000:]}")

    first = work / "first"
    if not first.exists():
        first.mkdir()
        (first / "0000.png").write_bytes((folder / "0000.png").read_bytes())
    one_seconds = timed(predict, first, work / "out_first")[0]
    all_seconds = timed(predict, folder, work / "out")[0]
    return megapixels / max(all_seconds - one_seconds, 1e-9)


def bench_config(args, filters, precision, slices, folder: Path, work: Path, ceiling: dict, device: str) -> dict:
    import numpy as np

    config = _config(filters, args.quick)
    model_path = save_random_model(config, work, f"unet{filters}")
    model, settings = mito.model_files.load_model(model_path)
    segmenter = mito.segmenter.Segmenter(model, settings, tile_size=args.tile_size, batch_size=args.batch_size,
                               precision=precision)
    images = list(slices)
    megapixels = sum(image.size for image in images) / 1e6
    tiled_seconds, tiled = steady_seconds(lambda: [segmenter.probability(image) for image in images], args.repeats)
    layout = mito.tiling.tile_layout(images[0].shape, segmenter.tile_size, segmenter.overlap, segmenter.align)
    computed = len(layout.tiles) * layout.tile_shape[0] * layout.tile_shape[1] / images[0].size

    normalized = segmenter.normalize(images[0])
    whole_seconds, whole = steady_seconds(
        lambda: mito.tiling.predict_whole(segmenter.predict_fn, normalized, segmenter.align), args.repeats)
    whole_rate = images[0].size / 1e6 / whole_seconds

    precise_model = mito.segmenter.with_precision(model, config, precision)
    naive_seconds, naive_tiles = naive_loop_seconds(precise_model, images[0], args.naive_tile, args.naive_stride,
                                                    args.naive_tiles)

    pipeline_rate = steady_pipeline_rate(args, model_path, precision, folder, work,
                                         megapixels - images[0].size / 1e6)

    flops = conv_flops_per_megapixel(model)
    tiled_rate = megapixels / tiled_seconds
    ceiling_rate = ceiling.get(precision, ceiling["float32"])
    return {
        "kind": "predict",
        "device": device,
        "filters": filters,
        "depth": config.depth,
        "precision": precision,
        "bf16_in_hardware": mito.segmenter.cpu_supports_bfloat16(),
        "slices": len(images),
        "timed_repetitions": args.repeats,  # after a warm-up; each time is their median
        "slice_shape": list(images[0].shape),
        "tile_size": segmenter.tile_size,
        "overlap": segmenter.overlap,
        "batch_size": segmenter.batch_size,
        "tiles_per_slice": len(layout.tiles),
        "computed_px_per_image_px": round(computed, 3),
        "tflop_per_mpx": round(flops / 1e12, 4),
        "tiled_mpx_per_s": round(tiled_rate, 4),
        "tiled_s_per_slice": round(tiled_seconds / len(images), 3),
        "gflops_useful": round(tiled_rate * flops / 1e9, 1),
        "gflops_computed": round(tiled_rate * computed * flops / 1e9, 1),
        "matmul_ceiling_gflops": round(ceiling_rate, 1),
        "fraction_of_ceiling": round(tiled_rate * computed * flops / 1e9 / ceiling_rate, 3),
        "whole_image_s": round(whole_seconds, 3),
        "tiled_rate_vs_whole_image": round(tiled_rate / whole_rate, 3),
        "tiled_max_diff_vs_whole_image": float(np.abs(tiled[0] - whole).max()),
        "naive_loop": f"model.predict per {args.naive_tile}px tile, stride {args.naive_stride}, "
                      f"{min(args.naive_tiles, naive_tiles)} of {naive_tiles} tiles timed and extrapolated",
        "naive_s_per_slice": round(naive_seconds, 3),
        "speedup_vs_naive": round(naive_seconds / (tiled_seconds / len(images)), 2),
        "pipeline_mpx_per_s": round(pipeline_rate, 4) if len(images) > 1 else None,
        "pipeline_vs_tiled": round(pipeline_rate / tiled_rate, 3) if len(images) > 1 else None,
        "pipeline": f"prediction_mito.py --save-prob: {len(images)} slices minus 1 slice (steady state)",
    }


def bench_memory(args, side: int, work: Path, reference: Path, device: str) -> list[dict]:
    import statistics

    import numpy as np
    import data

    config = _config(args.memory_filters, args.quick)
    model_path = save_random_model(config, work, f"memory{args.memory_filters}")
    large = work / f"large{side}"
    large.mkdir(exist_ok=True)
    page = write_slices(large, 1, side)[0]
    stack_path = work / f"stack{side}.tif"
    writer = StackWriter(stack_path, args.stack_pages)
    for index in range(args.stack_pages):
        writer.add(np.roll(page, 31 * index, axis=0))
    writer.close()
    del page
    extra = ["--save-prob", "--precision", args.memory_precision] + (["--tile-size", str(args.tile_size)]
                                                                      if args.tile_size else [])

    def predict(source, name):
        command = [str(REPO / "prediction_mito.py"), "--input", str(source), "--model",
                   str(model_path), "--output", str(work / name), "--overwrite", *extra]
        return measure_child(command)

    # Time per megapixel of tiled prediction, in this process: the small slices, then the large one.
    model, settings = mito.model_files.load_model(model_path)
    # By default what prediction_mito.py runs (bfloat16 where the CPU has it in hardware).
    segmenter = mito.segmenter.Segmenter(model, settings, tile_size=args.tile_size, batch_size=args.batch_size,
                                         precision=args.memory_precision)
    small = [data.read_image(path) for path in data.list_images(reference)]
    small_seconds, _ = steady_seconds(lambda slices=small: [segmenter.probability(each) for each in slices],
                                      args.repeats)
    small_rate = small_seconds / (sum(image.size for image in small) / 1e6)
    image = data.read_image(large / "0000.png")
    layout = mito.tiling.tile_layout(image.shape, segmenter.tile_size, segmenter.overlap, segmenter.align)
    segmenter.probability(image[: layout.tile_shape[0], : layout.tile_shape[1]])  # warm up the tile shape
    large_seconds = statistics.median(timed(segmenter.probability, image)[0] for _ in range(args.large_repeats))
    large_rate = large_seconds / (image.size / 1e6)
    tile_seconds = interior_tile_seconds(segmenter, model, layout, image, args.repeats)
    small_layout = mito.tiling.tile_layout(small[0].shape, segmenter.tile_size, segmenter.overlap, segmenter.align)
    computed = [len(each.tiles) * each.tile_shape[0] * each.tile_shape[1] / area
                for each, area in ((small_layout, small[0].size), (layout, image.size))]
    del image, small

    cases = [(f"{len(data.list_images(reference))} slices of {args.size}x{args.size}", reference, 0.0),
             (f"{side}x{side} PNG", large / "0000.png", large_rate),
             (f"{args.stack_pages}-page TIFF stack of {side}x{side}", stack_path, 0.0)]
    results = []
    for name, source, rate in cases:
        record = {"kind": "memory", "device": device, "filters": args.memory_filters, "input": name,
                  "precision": segmenter.precision, "tile_size": segmenter.tile_size}
        if args.no_memory_runs:
            if not rate:
                continue
        else:
            seconds, peak = predict(source, f"mem_{len(results)}")
            record |= {"peak_rss_mb": round(peak), "seconds": round(seconds, 2), "outputs": "mask + probability"}
        if rate:
            record |= {"tiled_s_per_mpx": round(rate, 4), f"tiled_s_per_mpx_{args.size}": round(small_rate, 4),
                       # the small slices: the median of --repeats passes after a warm-up pass; the large one:
                       # the median of --large-repeats passes after its tile shape was warmed up
                       "timed_repetitions": {"large": args.large_repeats, "small": args.repeats},
                       "time_per_mpx_vs_small": round(rate / small_rate, 3),
                       "computed_px_per_image_px": round(computed[1], 3),
                       # one inner tile of the large slice: the whole U-Net, and its decoder cropped (the default)
                       "inner_tile_s": tile_seconds,
                       f"computed_px_per_image_px_{args.size}": round(computed[0], 3)}
        results.append(record)
    return results


def interior_tile_seconds(segmenter, model, layout, image, repeats: int) -> dict:
    """Seconds for the inner tile of ``layout`` whose kept part lies farthest from the image's edges: the whole
    network, and the decoder cropped to the kept part (what prediction runs); each the median of ``repeats``."""
    import numpy as np

    tile = max(layout.tiles, key=lambda each: min(each.keep[0].start, each.keep[1].start))
    batch = np.ascontiguousarray(mito.tiling.read_tile(image, tile.read, (0, 0))[None, ..., None], np.float32)
    needed = tuple((part.start, part.stop) for part in tile.keep)
    whole = mito.segmenter.make_predict_fn(mito.segmenter.with_precision(model, segmenter.settings.unet,
                                                                         segmenter.precision))
    figures = {}
    for name, call in (("whole_network", lambda: whole(batch)),
                       ("decoder_cropped", lambda: segmenter.predict_fn(batch, needed))):
        figures[name] = round(steady_seconds(call, repeats)[0], 3)
    return figures | {"kept_px": int(np.prod([stop - start for start, stop in needed]))}


def run(args) -> int:
    import tensorflow as tf

    device = device_name()
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    precisions = args.precision or (["float32"] + (["bfloat16"] if mito.segmenter.cpu_supports_bfloat16() or on_gpu else [])
                                    + (["float16"] if on_gpu else []))
    lines = []

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        lines.append(line)

    ceiling = {precision: matmul_gflops(precision, 512 if args.quick else 2048, 0.5 if args.quick else 2.0)
               for precision in precisions}
    emit({"kind": "ceiling", "device": device, "bf16_in_hardware": mito.segmenter.cpu_supports_bfloat16(),
          "matmul_gflops": {key: round(value, 1) for key, value in ceiling.items()},
          "skipped": [] if args.precision or "bfloat16" in precisions else
          ["bfloat16: not supported in hardware here (no avx512_bf16/amx_bf16); --precision bfloat16 forces it"]})
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as temporary:
        work = Path(temporary)
        folder = work / "slices"
        slices = write_slices(folder, args.slices, args.size)
        for filters in args.filters:
            for precision in precisions:
                emit(bench_config(args, filters, precision, slices, folder, work, ceiling, device))
        for side in args.sizes:
            for record in bench_memory(args, side, work, folder, device):
                emit(record)
    if args.output:

        mito.files.atomic_write(args.output, lambda path: Path(path).write_text("\n".join(lines) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
