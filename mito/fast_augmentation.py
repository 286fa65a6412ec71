"""The fast augmentation engine: the transforms of mito.augmentation as vectorised TensorFlow ops, XLA-compiled."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mito.augmentation import TileSampler, reflect_to_at_least
from mito.errors import DataError


def _affine_transforms(tf, keys, batch: int, crop: int, out: int, geometry: dict):
    """Per-sample random affine transforms drawn from ``geometry`` (ImageDataGenerator's ranges).

    The same distribution as ``ImageDataGenerator.get_random_transform`` followed by
    ``apply_transform``: rotation, shift (a fraction of the crop), shear, zoom per axis,
    then flips, and (``transpose``, as ``augment_pair``) half the time a transpose of the
    output. keys: 6 random keys. Returns (batch, 8) float32 rows for
    ``ImageProjectiveTransformV3``, mapping an output pixel of an ``out``-sized tile to its
    source in the ``crop``-sized crop, both centred. Raises ValueError for settings this
    path does not implement.
    """
    known = {"rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
             "horizontal_flip", "vertical_flip", "transpose", "fill_mode"}
    if set(geometry) - known or geometry.get("fill_mode", "reflect") != "reflect":
        raise ValueError(f"the fast augmentation implements {sorted(known)} with fill_mode 'reflect', got {geometry}")
    zoom = geometry.get("zoom_range", 0.0)
    zoom = (1 - zoom, 1 + zoom) if np.isscalar(zoom) else tuple(zoom)

    def uniform(key, low, high, count=1):
        return tf.random.stateless_uniform((batch, count), key, low, high)

    theta = uniform(keys[0], -1.0, 1.0) * np.deg2rad(geometry.get("rotation_range", 0.0))
    shift = uniform(keys[1], -1.0, 1.0, 2) * crop * [geometry.get("width_shift_range", 0.0),
                                                     geometry.get("height_shift_range", 0.0)]
    shear = uniform(keys[2], -1.0, 1.0) * np.deg2rad(geometry.get("shear_range", 0.0))
    zooms = uniform(keys[3], zoom[0], zoom[1], 2)
    flips = uniform(keys[4], 0.0, 1.0, 2) < 0.5
    allowed = [geometry.get("horizontal_flip", False), geometry.get("vertical_flip", False)]
    flips = tf.where(flips & allowed, -1.0, 1.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # M = rotation @ shear @ zoom @ flip, in (x, y) = (column, row) coordinates; (batch, 1) entries.
    zx, zy = zooms[:, :1] * flips[:, :1], zooms[:, 1:] * flips[:, 1:]
    s00, s01, s11 = zx, -tf.sin(shear) * zy, tf.cos(shear) * zy
    m00, m01 = cos * s00, cos * s01 - sin * s11
    m10, m11 = sin * s00, sin * s01 + cos * s11
    if geometry.get("transpose"):  # M @ [[0, 1], [1, 0]]: swap the columns
        swap = uniform(keys[5], 0.0, 1.0) < 0.5
        m00, m01 = tf.where(swap, m01, m00), tf.where(swap, m00, m01)
        m10, m11 = tf.where(swap, m11, m10), tf.where(swap, m10, m11)
    c_in, c_out = (crop - 1) / 2, (out - 1) / 2
    t_x = cos * shift[:, :1] - sin * shift[:, 1:] + c_in - (m00 + m01) * c_out
    t_y = sin * shift[:, :1] + cos * shift[:, 1:] + c_in - (m10 + m11) * c_out
    zeros = tf.zeros_like(m00)
    return tf.concat([m00, m01, t_x, m10, m11, t_y, zeros, zeros], axis=1)


def _sample_pairs(tf, tables, width: int, origins, corners, limits, transforms, out: int):
    """Bilinear samples of ``out``-sized tiles around crop boxes of the stacked images.

    tables: flat (images * height * width,) arrays, the images and the masks (any number type);
    origins: (batch,) flat index of each sample's image; corners: (batch, 2) row and column
    of its crop box in that image; limits: (batch, 2) that image's height and width;
    transforms: (batch, 8) rows mapping an output pixel (x, y) to crop-box coordinates
    (``ImageProjectiveTransformV3``'s convention, affine part only). Beyond the box the
    image's own pixels are used, beyond the image its edge pixels. Returns one
    (batch, out, out, 1) array per table, all sampled at the same points. Gathers and
    arithmetic only, so XLA fuses it (separate tables, because XLA slows down badly on
    channel slices of a gathered array).
    """
    grid = tf.range(out, dtype=tf.float32)
    m = [transforms[:, k, None, None] for k in range(6)]
    corners, limits = tf.cast(corners, tf.float32), limits[:, :, None, None] - 2
    x = m[0] * grid[None, None, :] + m[1] * grid[None, :, None] + m[2] + corners[:, 1, None, None]
    y = m[3] * grid[None, None, :] + m[4] * grid[None, :, None] + m[5] + corners[:, 0, None, None]
    # The left/upper neighbour, kept inside the image; weights from the clipped neighbour, so the
    # last row and column are read exactly and points beyond the image take its edge pixels.
    x0 = tf.clip_by_value(tf.floor(x), 0.0, tf.cast(limits[:, 1], tf.float32))
    y0 = tf.clip_by_value(tf.floor(y), 0.0, tf.cast(limits[:, 0], tf.float32))
    wx, wy = tf.clip_by_value(x - x0, 0.0, 1.0), tf.clip_by_value(y - y0, 0.0, 1.0)
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    top = origins[:, None, None] + y0 * width + x0
    samples = []
    for table in tables:
        def at(offset, table=table):
            return tf.cast(tf.gather(table, top + offset), tf.float32)

        upper = at(0) * (1 - wx) + at(1) * wx
        lower = at(width) * (1 - wx) + at(width + 1) * wx
        samples.append((upper * (1 - wy) + lower * wy)[..., None])
    return samples


def _blur_batch(tf, images, keys, blur: float, radius: int):
    """Blur half the samples with a Gaussian of sigma uniform in [0.3, blur]; valid part only.

    images: (batch, y, x, 1) -> (batch, y - 2 * radius, x - 2 * radius, 1). Each sample has
    its own separable kernel, applied as a sum of shifted copies (which XLA fuses).
    """
    batch = images.shape[0]
    sigma = tf.random.stateless_uniform((batch, 1), keys[0], 0.3, blur)
    blurred = tf.random.stateless_uniform((batch, 1), keys[1]) < 0.5
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)[None]
    kernel = tf.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = tf.where(blurred, kernel / tf.reduce_sum(kernel, axis=1, keepdims=True),
                      tf.cast(offsets == 0, tf.float32))  # (batch, taps); identity when not blurred
    taps = [kernel[:, tap, None, None, None] for tap in range(2 * radius + 1)]
    rows, cols = images.shape[1] - 2 * radius, images.shape[2] - 2 * radius
    images = sum(weight * images[:, tap : tap + rows] for tap, weight in enumerate(taps))
    return sum(weight * images[:, :, tap : tap + cols] for tap, weight in enumerate(taps))


def _noise_batch(tf, bank, keys, shape):
    """Standard normal noise of ``shape`` (batch, y, x, 1), cut from ``bank`` (tiles, y, x).

    Each sample takes a random tile of the bank, shifted cyclically by a random offset and
    with a random sign: Gaussian noise for every pixel, at the cost of a gather instead of
    fresh random numbers (which cost a third of a batch on a CPU).
    """
    batch, rows, cols = shape[0], shape[1], shape[2]
    draws = tf.random.stateless_uniform((batch, 4), keys[0])
    tile = tf.cast(draws[:, 0] * bank.shape[0], tf.int32)[:, None, None]
    dy = tf.cast(draws[:, 1] * rows, tf.int32)[:, None, None]
    dx = tf.cast(draws[:, 2] * cols, tf.int32)[:, None, None]
    sign = tf.where(draws[:, 3] < 0.5, -1.0, 1.0)[:, None, None, None]
    y = tf.math.floormod(tf.range(rows)[None, :, None] + dy, rows)
    x = tf.math.floormod(tf.range(cols)[None, None, :] + dx, cols)
    return tf.gather(tf.reshape(bank, [-1]), (tile * rows + y) * cols + x)[..., None] * sign


def _jitter_batch(tf, images, keys, noise_field=None, brightness=0.0, contrast=0.0, gamma=1.0, noise=0.0):
    """``jitter_intensity`` without blur, vectorised: (batch, y, x, 1) float32 -> same, in [0, 1].

    noise_field: standard normal noise of the images' shape, needed when ``noise`` is set.
    """
    batch = images.shape[0]

    def uniform(key, low, high):
        return tf.random.stateless_uniform((batch, 1, 1, 1), key, low, high)

    exponent = tf.exp(uniform(keys[0], -np.log(gamma), np.log(gamma)))
    images = tf.exp(tf.math.log(tf.clip_by_value(images, 1e-6, 1.0)) * exponent)  # images ** exponent
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * uniform(keys[1], 1 - contrast, 1 + contrast) + mean
    images += uniform(keys[2], -brightness, brightness)
    if noise:
        images += noise_field * uniform(keys[3], 0.0, noise)
    return tf.clip_by_value(images, 0.0, 1.0)


class FastTrainingTiles(TileSampler):
    """``TrainingTiles`` in TensorFlow ops: the same tiles and augmentation, many times faster.

    The training images sit in memory as one tensor; each batch is cut, transformed and
    jittered by vectorised ops: random crops with context (picked by image area, as
    ``random_tile``), one random affine transform per sample (``geometry``, the
    ``ImageDataGenerator`` ranges) applied to the image and mask stacked as two channels of
    one array, so they cannot desynchronise (bilinear, reflecting at the crop border, mask
    re-binarised at 0.5), then ``intensity`` on the image only: blur of half the samples
    (when ``blur`` is set), gamma, contrast, brightness, noise.

    Batch ``(epoch, index)`` comes from stateless random ops keyed by (seed, epoch, index),
    so a resumed run sees the batches the interrupted one would have seen. The draws differ
    from ``TrainingTiles``' (another generator), the distribution is the same.

    A batch is ``(x, y)``: x ``(batch, tile, tile, 1)`` float32 in [0, 1], y the matching
    masks as float32 0/1.
    """

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *args, **kwargs):
        import tensorflow as tf

        super().__init__(*args, **kwargs)
        tile_size, seed, augment = self.tile_size, self.seed, self.augment
        blur = self.intensity.get("blur", 0.0)
        self.blur_radius = int(4 * blur + 0.5) if blur else 0  # scipy's gaussian_filter truncates at 4 sigma
        if augment:
            _affine_transforms(tf, [(0, 0)] * 6, 1, 1, 1, self.geometry)  # unsupported settings fail now
        crop = tile_size + 2 * self.context
        images = [reflect_to_at_least(image, crop) for image in images]
        masks = [reflect_to_at_least(mask, crop) for mask in masks]
        self.shapes = np.array([image.shape for image in images], np.int32)
        self.height, self.width = (int(length) for length in self.shapes.max(axis=0))
        if len(images) * self.height * self.width >= 2**31:
            raise DataError(f"{len(images)} training images of up to {self.height} x {self.width} pixels are too many "
                            "for --augmentation-engine fast (2**31 pixels at most); use --augmentation-engine keras")
        self.tables = []  # the images (float32), then the masks (uint8), each flat: (images * height * width,)
        for arrays, dtype in ((images, np.float32), (masks, np.uint8)):
            stack = np.zeros((len(arrays), self.height, self.width), dtype)
            for number, array in enumerate(arrays):
                stack[number, : array.shape[0], : array.shape[1]] = array
            self.tables.append(tf.constant(stack.reshape(-1)))
        area = np.cumsum(self.shapes.prod(axis=1).astype(np.float64) if self.image_weights is None
                         else self.image_weights)
        self.cumulative_area = tf.constant((area / area[-1])[None, :-1], tf.float32)  # (1, images - 1)
        # XLA fuses the per-pixel arithmetic into a few loops: several times faster than op by op.
        self._jitted = tf.function(self._make_batch_xla, jit_compile=True)
        self._batch = tf.function(self._make_batch)
        self.noise_bank = None
        if self.intensity.get("noise"):  # 16 tiles of Gaussian noise, cut per sample by _noise_batch
            self.noise_bank = tf.random.stateless_normal((16, tile_size, tile_size), (seed, 2**31 - 1))

    def _make_batch(self, epoch, index):
        """Batch (epoch, index) as two tensors."""
        import tensorflow as tf

        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(self.seed, tf.int64), epoch]), index)
        return self._jitted(tf.random.experimental.stateless_split(key, 16))

    def _make_batch_xla(self, keys):
        import tensorflow as tf

        keys = tf.unstack(keys)
        batch, tile = self.batch_size, self.tile_size
        crop = tile + 2 * self.context
        # A crop box per sample: an image picked by area, then a position inside it.
        pick = tf.random.stateless_uniform((batch, 1), keys[0])
        chosen = tf.reduce_sum(tf.cast(pick >= self.cumulative_area, tf.int32), axis=1)
        limits = tf.gather(self.shapes, chosen)
        room = tf.cast(limits - crop + 1, tf.float32)  # (batch, 2)
        corner = tf.cast(tf.random.stateless_uniform((batch, 2), keys[1]) * room, tf.int32)
        origins = chosen * self.height * self.width
        if self.augment:
            out = tile + 2 * self.blur_radius
            transforms = _affine_transforms(tf, keys[2:7] + keys[15:16], batch, crop, out, self.geometry)
            image, mask = _sample_pairs(tf, self.tables, self.width, origins, corner, limits, transforms, out)
            if self.blur_radius:
                image = _blur_batch(tf, image, keys[7:9], self.intensity["blur"], self.blur_radius)
                r = self.blur_radius
                mask = mask[:, r:-r, r:-r]
            jitter = {name: value for name, value in self.intensity.items() if name != "blur"}
            noise = None
            if self.noise_bank is not None:
                noise = _noise_batch(tf, self.noise_bank, keys[14:15], (batch, tile, tile))
            image = _jitter_batch(tf, image, keys[9:14], noise, **jitter) if jitter else image
            mask = tf.cast(mask > 0.5, tf.float32)
        else:
            grid = tf.range(tile)
            top_left = origins + corner[:, 0] * self.width + corner[:, 1]
            image, mask = (tf.cast(tf.gather(table, top_left[:, None, None] + grid[:, None] * self.width + grid),
                                   tf.float32)[..., None] for table in self.tables)
        shape = (batch, tile, tile, 1)
        return tf.ensure_shape(image, shape), tf.ensure_shape(mask, shape)

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch`` as NumPy arrays (the one ``dataset`` yields there)."""
        import tensorflow as tf

        x, y = self._batch(tf.constant(epoch, tf.int64), tf.constant(index, tf.int64))
        return x.numpy(), y.numpy()

    def dataset(self, first_epoch: int, epochs: int, workers: int = 1, input_context=None):
        """A tf.data.Dataset of the batches of epochs first_epoch .. epochs - 1, in order.

        ``workers`` batches are prepared in parallel (each one also uses TensorFlow's
        own threads); the order stays fixed. Use like ``TrainingTiles.dataset``; one
        machine only: with an ``input_context`` (several workers) it raises DataError.
        """
        import tensorflow as tf

        if input_context is not None and input_context.num_input_pipelines > 1:
            raise DataError("--augmentation-engine fast does not split batches among several machines yet; "
                            "use --augmentation-engine keras there")

        steps = self.steps_per_epoch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        steps_range = tf.data.Dataset.range(first_epoch * steps, epochs * steps)
        return (steps_range.map(lambda step: self._batch(step // steps, step % steps),
                                num_parallel_calls=max(1, workers), deterministic=True)
                .prefetch(2).with_options(options))
