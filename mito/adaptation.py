"""Adapting a trained model to new EM without labels: batch-norm statistics re-estimated on the new slices.

A batch-normalised U-Net normalises each layer's activations with the mean and variance it saw in
training. EM of another microscope, stain or tissue shifts those statistics; re-estimating them on
the slices about to be predicted (AdaBN, Li et al. 2016) lets every layer see the new data as it saw
the old, without a label or a gradient step. The weights are untouched.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data import normalize, rescale_image
from mito.augmentation import grid_tiles
from mito.errors import ConfigError

ADAPTATION_TILE = 256  # px at the model's scale, like a training tile a few times over
MAX_TILES = 512  # spread over the slices: enough for stable statistics, a bounded cost for a big folder


def batchnorm_layers(model: tf.keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]


def adapt_batchnorm(model: tf.keras.Model, settings, raw_slices, batch_size: int = 8) -> int:
    """Replace every batch-norm layer's moving mean and variance by their average over tiles of
    ``raw_slices`` (raw (y, x) EM slices, normalised and resampled as the model reads them).
    Returns the number of tiles used. ConfigError for a model without batch norm."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ConfigError("the model has no batch-norm layers to adapt (train it with --batch-norm)")
    tiles = adaptation_tiles(settings, raw_slices, settings.unet.alignment)
    momenta = [layer.momentum for layer in layers]
    try:
        for number, start in enumerate(range(0, len(tiles), batch_size)):
            for layer in layers:  # moving = average of the batch statistics seen so far
                layer.momentum = number / (number + 1)
            model(tiles[start : start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(tiles)


def adaptation_tiles(settings, raw_slices, alignment: int) -> np.ndarray:
    """Non-overlapping tiles of the slices as the model sees them, at most MAX_TILES spread evenly."""
    images = [rescale_image(normalize(raw, settings.normalization), settings.scale) for raw in raw_slices]
    smallest = min(min(image.shape) for image in images)
    tile = max(alignment, min(ADAPTATION_TILE, smallest // alignment * alignment))
    tiles, _ = grid_tiles(images, images, tile)
    if len(tiles) > MAX_TILES:
        tiles = tiles[np.linspace(0, len(tiles) - 1, MAX_TILES).round().astype(int)]
    return tiles


ADAPTATION_SLICES = 16  # spread over the whole input: every shard of a cluster run adapts alike


def sample_slices(files: list, count: int = ADAPTATION_SLICES) -> list[np.ndarray]:
    """Up to ``count`` raw slices spread evenly over ``files`` (images and the pages of TIFF stacks), read
    one at a time so that a long stack is never held whole."""
    from data import count_slices, iter_slices

    sizes = [count_slices(path) for path in files]
    total = sum(sizes)
    wanted = set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist())
    slices, first = [], 0
    for path, size in zip(files, sizes):
        if wanted & set(range(first, first + size)):
            slices += [page for index, page in enumerate(iter_slices(path), first) if index in wanted]
        first += size
    return slices


def adapt_to_input(model: tf.keras.Model, settings, files: list) -> dict:
    """adapt_batchnorm on slices sampled from ``files``; what was done, for the outputs' records."""
    slices = sample_slices(files)
    tiles = adapt_batchnorm(model, settings, slices)
    print(f"Adapted the batch-norm statistics to {len(slices)} input slices ({tiles} tiles)")
    return {"method": "batch-norm statistics re-estimated on the input (AdaBN)", "slices": len(slices),
            "tiles": tiles}
