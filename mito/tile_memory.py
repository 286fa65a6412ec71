"""How large prediction tiles are when the model leaves it open: the largest whose forward pass fits a budget.

A tile is computed with the network's reach as a margin on every side it shares with another tile, and the
margins are thrown away; the larger the tile, the smaller their share. An 8192 px slice computes 1.49 px
per image px in 1280 px tiles and 1.20 in 2240 px tiles, which took its time per megapixel from 1.28-1.31
to 1.01-1.16 times a 1024 px slice's (16 filters; benchmarks/RESULTS.md, "Tile size from a memory budget").
The forward pass holds a few full-resolution feature maps at a time, so its memory grows with the tile's
area, the base filters and the bytes of its arithmetic.
"""

from __future__ import annotations

import math

# Bytes the forward pass of one tile may hold: beside it, an 8192 x 8192 slice's float32 copy and
# probability and a TIFF stack's reader (the next page normalised ahead) and writer kept prediction_mito.py
# at 2.97 GB, just under 3 GB, with 2240-px tiles of a 16-filter U-Net in bfloat16 (the largest this allows).
TILE_MEMORY_BUDGET = 1.125e9
# Tiles are never smaller than this (the tile size of models whose JSON records one): slices up to it
# are one bare prediction.
MINIMUM_TILE = 1280
# Peak bytes per tile pixel per base filter, measured as the resident memory a U-Net's first tile adds
# (depth 4; 8, 16 and 64 filters): float32 27 with or without batch norm (fused into the convolution);
# bfloat16 and float16 14, and 18.5 with batch norm (computed apart).
BYTES_PER_PIXEL_PER_FILTER = {"float32": (27.0, 27.0), "half": (14.0, 18.5)}


def forward_bytes(config, precision: str, tile: int, batch_size: int = 1) -> float:
    """Estimated peak bytes of the forward pass of ``batch_size`` square tiles of side ``tile``.

    config: a unet.UNetConfig; precision: 'float32', 'bfloat16' or 'float16'.
    """
    plain, with_batch_norm = BYTES_PER_PIXEL_PER_FILTER["float32" if precision == "float32" else "half"]
    per_filter = with_batch_norm if config.batch_norm else plain
    return batch_size * tile**2 * config.base_filters * per_filter


def auto_tile_size(config, precision: str, batch_size: int = 1) -> int:
    """The largest tile side, a multiple of the network's alignment, whose ``forward_bytes`` fit
    ``TILE_MEMORY_BUDGET``, and at least ``MINIMUM_TILE``."""
    side = math.isqrt(int(TILE_MEMORY_BUDGET / forward_bytes(config, precision, 1, batch_size)))
    return max(MINIMUM_TILE, side // config.alignment * config.alignment)
