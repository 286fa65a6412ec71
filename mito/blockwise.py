"""Blockwise prediction of a zarr volume: the block grid and halos, the per-slice normalisation statistics,
and the tasks a Dask worker runs on one block (predict, clean up, downsample), each recorded done.

Why the result equals whole-slice prediction:

- the network: each block is read with a halo of at least the network's receptive-field reach, rounded
  to its pooling grid, and only its core is kept; blocks start on that grid (``Job.align``), so every
  pixel sees what it sees in a whole-slice prediction (up to float rounding, as tiles do);
- the normalisation: a model that normalises by a slice's percentiles cannot let a block normalise
  itself; the percentiles (and the fill value of NaN pixels) are computed once per slice
  (``slice_statistics``, from every pixel up to ``SAMPLE_PIXELS`` and from an even grid of that many
  above) and every block of the slice applies the same;
- the clean-up (small objects removed, holes filled) is not local: it runs as a second pass over the
  thresholded mask, read with a halo of ``min_size + max_hole + 1`` px. An object or hole of at most
  that many pixels that touches a block's core lies inside the halo, and one that reaches past it is
  larger than both sizes, so each core comes out as in the whole slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from mito.cleanup import postprocess
from mito.errors import DataError
from mito.volume import open_output, open_volume

SAMPLE_PIXELS = 4_000_000  # per slice, for the normalisation statistics
INVALID = 2  # code of pixels without a finite value in the thresholded mask (0 background, 1 foreground)
STAGES = ("predict", "clean")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def block_side(chunk: int, align: int, wanted: int) -> int:
    """A block side in y or x: a multiple of the output chunk (no two blocks write one chunk) and of the
    network's pooling grid (blocks see the whole slice's grid), at least ``wanted`` if the grid allows."""
    unit = math.lcm(chunk, align)
    return max(unit, wanted // unit * unit)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every block task needs, small enough to send to each worker (paths, numbers, a loader)."""

    input: str
    array: str | None
    work: str  # folder of the thresholded mask and the done markers
    mask: str  # level 0 of the output mask
    prob: str | None
    prob_dtype: str
    loader: Callable  # () -> Segmenter, cached per worker process (mito.volume_model.worker_segmenter)
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]  # of every output array
    block: tuple[int, int, int]
    halo: int  # input pixels read around a block for the network
    cleanup: dict  # {"min_size", "max_hole"}
    normalization: dict
    level1: str | None = None  # the mask's pyramid level 1, when the clean-up pass writes it (``fused_level1``)

    @property
    def cleanup_halo(self) -> int:
        size, hole = self.cleanup.get("min_size", 0), self.cleanup.get("max_hole", 0)
        return size + hole + 1 if size > 1 or hole > 0 else 0

    def origins(self) -> list[tuple[int, int, int]]:
        (depth, height, width), (dz, dy, dx) = self.shape, self.block
        return [(z, y, x) for z in range(0, depth, dz) for y in range(0, height, dy) for x in range(0, width, dx)]

    def windows(self, origin, halo: int):
        """(core in the volume, core plus ``halo`` in y-x clipped to the volume, core inside that window)."""
        core = tuple(slice(start, min(start + side, length))
                     for start, side, length in zip(origin, self.block, self.shape))
        window = (core[0], *(slice(max(0, c.start - halo), min(length, c.stop + halo))
                             for c, length in zip(core[1:], self.shape[1:])))
        inner = (slice(None), *(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core[1:], window[1:])))
        return core, window, inner


def network_halo(overlap: int, align: int, scale: float) -> tuple[int, int]:
    """(halo, grid) in input pixels for a model whose tiles overlap by ``overlap`` model pixels (twice the
    receptive-field reach), pooling grid ``align`` and resampling ``scale``."""
    grid = math.ceil(align / scale)
    return round_up(math.ceil(math.ceil(overlap / 2) / scale), grid), grid


# --- normalisation ---------------------------------------------------------------


def slice_statistics(job: Job, z: int) -> dict:
    """What normalising slice ``z`` needs, as ``data.normalize`` computes it on the whole slice:
    ``low`` and ``scale`` of the percentile mode, and ``fill``, the median of the normalised finite pixels
    (NaN pixels get it for the network). Read band by band. Exact for 8- and 16-bit integer slices of any
    size (a histogram of every pixel); other types from every pixel when the slice has at most
    ``SAMPLE_PIXELS``, else from an even grid of about that many (a documented approximation)."""
    volume = open_cached(job.input, job.array)
    _, height, width = volume.shape
    if volume.dtype.kind in "ui" and volume.dtype.itemsize <= 2:
        return _histogram_statistics(job, volume, z)
    step = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    band = max(volume.chunks[1], step)
    parts = [volume.read(slice(z, z + 1), slice(y, min(y + band, height)), slice(0, width))[0]
             [(-y) % step::step, ::step] for y in range(0, height, band)]
    sample = np.concatenate(parts).astype(np.float32)
    finite = np.isfinite(sample)
    if not finite.any():
        raise DataError(f"{job.input}: slice {z} has no finite pixel (all NaN or infinite)")
    stats = {"low": 0.0, "scale": 1.0, "fill": 0.0, "sampled_every": step}
    if job.normalization.get("mode") == "percentile":
        percentiles = [job.normalization.get("low", 1.0), job.normalization.get("high", 99.8)]
        low, high = np.percentile(sample[finite], percentiles)
        stats["low"], stats["scale"] = float(low), float(high - low) if high > low else 1.0
    normalised = normalize_with(sample[finite], volume.dtype, job.normalization, stats)
    stats["fill"] = float(np.median(normalised))
    return stats


def _histogram_statistics(job: Job, volume, z: int) -> dict:
    """``slice_statistics`` of an integer slice from the histogram of all its pixels: the order statistics
    NumPy's percentiles interpolate between are exact, so blocks normalise as the whole slice does. (An
    integer slice has no NaN, so ``fill`` is never used; it is the normalised median for completeness.)"""
    _, height, width = volume.shape
    offset = int(np.iinfo(volume.dtype).min)
    counts = np.zeros(2 ** (8 * volume.dtype.itemsize), np.int64)
    band = volume.chunks[1]
    for y in range(0, height, band):
        values = np.asarray(volume.read(slice(z, z + 1), slice(y, min(y + band, height)), slice(0, width)))
        codes = values.ravel() if offset == 0 else values.astype(np.int32).ravel() - offset
        counts += np.bincount(codes, minlength=len(counts))
    stats = {"low": 0.0, "scale": 1.0, "fill": 0.0, "sampled_every": 1}
    if job.normalization.get("mode") == "percentile":
        low, high = percentiles_from_histogram(counts, offset, [job.normalization.get("low", 1.0),
                                                                job.normalization.get("high", 99.8)])
        stats["low"], stats["scale"] = low, high - low if high > low else 1.0
    median = percentiles_from_histogram(counts, offset, [50.0])[0]
    stats["fill"] = float(normalize_with(np.array([median], np.float32), volume.dtype, job.normalization, stats)[0])
    return stats


def percentiles_from_histogram(counts: np.ndarray, offset: int, percentiles: list[float]) -> list[float]:
    """``np.percentile`` (linear method) of the values whose histogram is ``counts`` (value ``offset + i``
    occurs ``counts[i]`` times), without the values: the two order statistics around each percentile's
    position, interpolated as NumPy does."""
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])

    def order_statistic(index: int) -> float:
        return float(np.searchsorted(cumulative, index, side="right") + offset)

    results = []
    for percentile in percentiles:
        position = (total - 1) * (percentile / 100)
        below = math.floor(position)
        a, b = order_statistic(below), order_statistic(min(below + 1, total - 1))
        t = position - below
        results.append(a if a == b else (b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t))
    return results


def normalize_with(raw: np.ndarray, dtype, normalization: dict, stats: dict) -> np.ndarray:
    """``data.normalize`` of a window of a slice with that slice's statistics: float32 in [0, 1], NaN where the
    input has no finite value. ``dtype`` is the volume's (the range mode divides integers by its maximum)."""
    if normalization.get("mode") == "percentile":
        values = raw.astype(np.float32)
        values -= np.float32(stats["low"])
        values /= np.float32(stats["scale"])
    elif np.dtype(dtype).kind in "ui":
        values = raw.astype(np.float32) / np.iinfo(dtype).max
    else:
        values = raw.astype(np.float32)
    values = np.clip(values, 0.0, 1.0, out=values)
    if np.dtype(dtype).kind == "f":
        values[~np.isfinite(raw)] = np.nan
    return values


# --- the tasks ---------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def open_cached(path: str, array: str | None):
    """The input volume, opened once per worker process."""
    return open_volume(path, array)


def marker(job: Job, stage: str, origin) -> Path:
    return Path(job.work) / "done" / stage / "-".join(map(str, origin))


def done_blocks(job: Job, stage: str) -> set[tuple[int, int, int]]:
    """Blocks recorded done in ``stage``, from their markers."""
    folder = Path(job.work) / "done" / stage
    if not folder.is_dir():
        return set()
    return {tuple(int(part) for part in name.split("-")) for name in os.listdir(folder) if name.count("-") == 2}


def mark_done(job: Job, stage: str, origin) -> None:
    """Record a block done; called after its data are written, so a marker never precedes its data."""
    path = marker(job, stage, origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def predict_block(job: Job, origin: tuple[int, int, int], stats: list[dict]) -> tuple[int, int, int]:
    """Predict one block (``stats``: its slices' normalisation): the thresholded core goes to the work array
    (0, 1, or INVALID where the input had no finite value) and the probability to ``job.prob`` if asked."""
    if marker(job, "predict", origin).exists():  # a retry of a task whose first try finished
        return origin
    segmenter = job.loader()
    volume = open_cached(job.input, job.array)
    core, window, inner = job.windows(origin, job.halo)
    raw = volume.read(*window)
    codes = np.empty([c.stop - c.start for c in core], np.uint8)
    probabilities = np.empty(codes.shape, np.float32)
    for index, (page, slice_stats) in enumerate(zip(raw, stats)):
        image = normalize_with(page, volume.dtype, job.normalization, slice_stats)
        invalid = np.isnan(image)
        if invalid.any():
            image[invalid] = np.float32(slice_stats["fill"])
        probability = segmenter.probability_of_normalized(image)
        probability[invalid] = np.nan
        probabilities[index] = probability[inner[1:]]
    valid = np.isfinite(probabilities)
    codes[:] = np.where(valid, probabilities >= segmenter.threshold, INVALID)
    open_output(str(Path(job.work) / "thresholded"))[core] = codes
    if job.prob:
        open_output(job.prob)[core] = encode_probability(probabilities, job.prob_dtype)
    mark_done(job, "predict", origin)
    return origin


def encode_probability(probability: np.ndarray, dtype: str) -> np.ndarray:
    """uint8: round(255 p), 0 where NaN; float16: as it is (NaN kept)."""
    if dtype == "uint8":
        return np.round(np.nan_to_num(probability, nan=0.0) * 255).astype(np.uint8)
    return probability.astype(np.float16)


def clean_block(job: Job, origin: tuple[int, int, int]) -> tuple[int, int, int]:
    """Clean up one block of the thresholded mask (read with the clean-up halo) into the output mask (0/255)."""
    if marker(job, "clean", origin).exists():
        return origin
    core, window, inner = job.windows(origin, job.cleanup_halo)
    codes = np.asarray(open_output(str(Path(job.work) / "thresholded"))[window])
    mask = np.empty([c.stop - c.start for c in core], np.uint8)
    for index, page in enumerate(codes):
        cleaned = postprocess(page == 1, job.cleanup) & (page != INVALID)
        mask[index] = cleaned[inner[1:]] * np.uint8(255)
    open_output(job.mask)[core] = mask
    if job.level1:  # the first pyramid level from the block in hand, instead of reading level 0 again
        level1 = open_output(job.level1)
        rows = slice(core[1].start // 2, min(core[1].stop // 2, level1.shape[1]))
        columns = slice(core[2].start // 2, min(core[2].stop // 2, level1.shape[2]))
        height, width = rows.stop - rows.start, columns.stop - columns.start
        level1[core[0], rows, columns] = halve(mask[:, :2 * height, :2 * width])
    mark_done(job, "clean", origin)
    return origin


def fused_level1(block, chunks, level1_shape) -> bool:
    """Whether clean-up blocks can write pyramid level 1 themselves: each half block must cover whole chunks of
    that level (no two tasks write one chunk)."""
    return all((side // 2) % min(chunk, length) == 0 and side % 2 == 0
               for side, chunk, length in zip(block[1:], chunks[1:], level1_shape[1:]))


def halve(pixels: np.ndarray) -> np.ndarray:
    """The maximum of each 2 x 2 pixels in y-x (thin mitochondria stay visible); y and x must be even."""
    depth, height, width = pixels.shape
    return pixels.reshape(depth, height // 2, 2, width // 2, 2).max(axis=(2, 4))


def downsample_block(source: str, target: str, origin: tuple[int, int, int], block: tuple[int, int, int]):
    """One block of a pyramid level: the maximum of each 2 x 2 pixels of the level below (thin mitochondria
    stay visible), z unchanged."""
    target_array = open_output(target)
    core = tuple(slice(start, min(start + side, length))
                 for start, side, length in zip(origin, block, target_array.shape))
    rows, columns = slice(2 * core[1].start, 2 * core[1].stop), slice(2 * core[2].start, 2 * core[2].stop)
    target_array[core] = halve(np.asarray(open_output(source)[core[0], rows, columns]))
    return origin


def gather_with_progress(futures: list, name: str, unit: str) -> list:
    """Wait for Dask ``futures`` with a progress bar; their results in order. A task's error is raised here
    (a DataError names the file); an interruption cancels what is left."""
    from distributed import as_completed
    from tqdm import tqdm

    try:
        with tqdm(total=len(futures), desc=name, unit=unit, file=sys.stderr) as progress:
            for future in as_completed(futures):
                future.result()
                advance(progress)
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def advance(progress) -> None:
    """One more task finished (tests replace it to interrupt a run)."""
    progress.update()
