"""Tiled prediction of slices of any size: one tile geometry, one assembly loop, and test-time augmentation.

Tiles overlap by the network's receptive field, so the stitched result equals the
prediction of the whole slice in one piece (tests/test_tiling.py checks it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from mito.errors import DataError


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: ``read`` in the padded image, ``keep`` inside the tile's output,
    ``write`` in the output image. All are (y-slice, x-slice)."""

    read: tuple[slice, slice]
    keep: tuple[slice, slice]
    write: tuple[slice, slice]


@dataclasses.dataclass(frozen=True)
class TileLayout:
    pad: tuple[tuple[int, int], tuple[int, int]]  # reflect padding of the image, (before, after) per axis
    tile_shape: tuple[int, int]  # every tile has this shape
    tiles: tuple[Tile, ...]




def _axis_layout(length: int, tile_size: int, margin: int, align: int):
    """Cut one axis into ``n`` equal aligned tiles overlapping by at least ``2 * margin``.

    Returns (tile side, [(read start, write start, write stop)], padding after the axis).
    The axis is padded only at its end, to a multiple of ``align``; the first and
    last tiles start and stop at the image's edges, where the network's own
    padding applies as in a whole-image prediction, so margins are spent only
    between tiles. Each tile keeps the part of its overlaps nearer its centre.
    """
    padded = round_up(length, align)
    if padded <= tile_size:
        return padded, [(0, 0, length)], padded - length
    count = math.ceil((padded - 2 * margin) / (tile_size - 2 * margin))
    side = round_up(math.ceil((padded + (count - 1) * 2 * margin) / count), align)
    # Spread the starts evenly on the alignment grid: consecutive starts differ by at most side - 2 * margin.
    starts = [(index * (padded - side) // (count - 1)) // align * align for index in range(count)]
    cuts = [0] + [min(length, (start + following + side) // 2) for start, following in zip(starts, starts[1:])]
    spans = [(start, cut, stop) for start, cut, stop in zip(starts, cuts, cuts[1:] + [length])]
    return side, spans, padded - length


def tile_layout(shape: tuple[int, int], tile_size: int, overlap: int, align: int = 1) -> TileLayout:
    """The geometry of a tiled prediction, computed once for cropping and merging.

    Tiles of equal shape, at most ``tile_size``, overlap by at least
    ``overlap`` (rounded up to ``align``); each output pixel is kept from the
    one tile where it lies at least ``overlap // 2`` from every border that
    is not the image's own. At the image's edges nothing is added (only a
    reflect padding to the next multiple of ``align`` at the end of each
    axis), so a slice that fits in one tile is one bare prediction. Tile
    origins and sizes are multiples of ``align`` (``2**depth`` for a U-Net),
    so every tile sees the pooling grid of the whole image: with an overlap of
    at least twice the network's receptive-field reach the result equals
    whole-image prediction (``predict_whole``).
    """
    if tile_size < 1 or overlap < 0 or align < 1:
        raise DataError(f"invalid tiling: tile_size={tile_size}, overlap={overlap}, align={align}")
    margin = round_up(math.ceil(overlap / 2), align)
    tile_size = tile_size // align * align
    if tile_size - 2 * margin < align:
        raise DataError(
            f"tile size {tile_size} is too small for overlap {2 * margin}: "
            f"use a tile size of at least {2 * margin + align}"
        )
    (tile_y, spans_y, pad_y), (tile_x, spans_x, pad_x) = (
        _axis_layout(length, tile_size, margin, align) for length in shape
    )
    tiles = []
    for read_y, y0, y1 in spans_y:
        for read_x, x0, x1 in spans_x:
            tiles.append(
                Tile(
                    read=(slice(read_y, read_y + tile_y), slice(read_x, read_x + tile_x)),
                    keep=(slice(y0 - read_y, y1 - read_y), slice(x0 - read_x, x1 - read_x)),
                    write=(slice(y0, y1), slice(x0, x1)),
                )
            )
    return TileLayout(pad=((0, pad_y), (0, pad_x)), tile_shape=(tile_y, tile_x), tiles=tuple(tiles))


def _reflect_indices(start: int, stop: int, length: int) -> np.ndarray | slice:
    """Indices into an axis of ``length`` for positions ``start..stop`` of its reflect-padded version.

    Position 0 is the axis' first pixel; negative positions and positions past
    the end mirror about the edge pixels (``np.pad(mode="reflect")``, repeated
    when the padding is wider than the axis). A plain slice when nothing mirrors.
    """
    if 0 <= start and stop <= length:
        return slice(start, stop)
    if length == 1:
        return np.zeros(stop - start, np.intp)
    period = 2 * (length - 1)
    phase = np.arange(start, stop) % period
    return np.where(phase < length, phase, period - phase)


def read_tile(image: np.ndarray, read: tuple[slice, slice], pad: tuple[int, int]) -> np.ndarray:
    """The window ``read`` of ``image`` reflect-padded by ``pad`` (before y, before x), without padding the image.

    Equals ``np.pad(image, ..., mode="reflect")[read]`` but copies only the window.
    """
    rows = _reflect_indices(read[0].start - pad[0], read[0].stop - pad[0], image.shape[0])
    cols = _reflect_indices(read[1].start - pad[1], read[1].stop - pad[1], image.shape[1])
    if isinstance(rows, slice) and isinstance(cols, slice):
        return image[rows, cols]
    rows, cols = (np.arange(s.start, s.stop) if isinstance(s, slice) else s for s in (rows, cols))
    return image[np.ix_(rows, cols)]


def predict_tiled(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile_size: int = 1024,
    overlap: int = 0,
    align: int = 1,
    batch_size: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Apply ``predict_fn`` to an image of any size in overlapping tiles and stitch.

    image: (y, x), float32 in [0, 1] (other dtypes are converted tile by tile).
    predict_fn maps a batch (n, ty, tx, 1) float32 to (n, ty, tx, 1) or
    (n, ty, tx); one with ``takes_needed_region`` set is also given the part
    of the batch's tiles that is kept, ((y0, y1), (x0, x1)), and may leave
    the rest undefined (``mito.lean_forward``). Returns (y, x) float32, written into ``out`` when given.
    Each output pixel comes from exactly one tile, taken at least
    ``overlap // 2`` pixels away from that tile's borders inside the image,
    so there are no seams (see ``tile_layout``). Memory beyond the image and the output is one
    batch of tiles: the image is never padded or copied as a whole.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"predict_tiled expects a 2D image, got shape {image.shape}")
    layout = tile_layout(image.shape, tile_size, overlap, align)
    if out is None:
        out = np.empty(image.shape, np.float32)
    before = (layout.pad[0][0], layout.pad[1][0])
    tiles = list(layout.tiles)
    batch = np.empty((min(batch_size, len(tiles)), *layout.tile_shape, 1), np.float32)
    for start in range(0, len(tiles), batch_size):
        batch_tiles = tiles[start : start + batch_size]
        for slot, tile in enumerate(batch_tiles):
            batch[slot, ..., 0] = read_tile(image, tile.read, before)
        if getattr(predict_fn, "takes_needed_region", False):
            result = np.asarray(predict_fn(batch[: len(batch_tiles)], _kept_union(batch_tiles)))
        else:
            result = np.asarray(predict_fn(batch[: len(batch_tiles)]))
        if result.ndim == 4:
            result = result[..., 0]
        if result.shape != (len(batch_tiles), *layout.tile_shape):
            raise ValueError(f"predict_fn returned shape {result.shape} for a batch of shape "
                             f"{(len(batch_tiles), *layout.tile_shape, 1)}")
        for tile, tile_result in zip(batch_tiles, result):
            out[tile.write] = tile_result[tile.keep]
    return out


def _kept_union(tiles) -> tuple[tuple[int, int], tuple[int, int]]:
    """The smallest ((y0, y1), (x0, x1)) of a tile that holds every ``keep`` of ``tiles``."""
    return tuple((min(tile.keep[axis].start for tile in tiles), max(tile.keep[axis].stop for tile in tiles))
                 for axis in (0, 1))


def predict_whole(predict_fn, image: np.ndarray, align: int = 1) -> np.ndarray:
    """Predict an image in one piece: one bare call, padded (reflect) only at its end to a multiple of ``align``."""
    pad = [(0, round_up(length, align) - length) for length in image.shape]
    padded = np.pad(np.asarray(image, np.float32), pad, mode="reflect")
    result = np.asarray(predict_fn(padded[None, ..., None]), np.float32).reshape(padded.shape)
    return result[: image.shape[0], : image.shape[1]]


def with_tta(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: average ``predict_fn`` over the 8 flips and 90-degree rotations.

    Each of the 8 transforms of a batch (n, y, x, 1) is predicted and mapped
    back by the inverse transform before averaging, so the result has the
    input's shape and orientation. Costs 8 predictions; for predict_tiled,
    tiles must be square or have both sides aligned (they are).
    """

    def predict(batch):
        batch = np.asarray(batch, np.float32)
        total = np.zeros(batch.shape, np.float32)
        for flip in (False, True):
            flipped = batch[:, :, ::-1] if flip else batch
            for quarter_turns in range(4):
                turned = np.rot90(flipped, quarter_turns, axes=(1, 2))
                result = np.asarray(predict_fn(np.ascontiguousarray(turned)), np.float32).reshape(turned.shape)
                result = np.rot90(result, -quarter_turns, axes=(1, 2))
                total += result[:, :, ::-1] if flip else result
        return total / 8

    return predict
