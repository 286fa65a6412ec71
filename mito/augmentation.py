"""Paired augmentation with Keras' ImageDataGenerator: random training tiles, the image and its mask moved alike.

``TrainingTiles`` feeds ``model.fit`` through ``tf.data``; ``mito.fast_augmentation``
draws the same kinds of transforms with TensorFlow ops.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np

from mito.errors import DataError


# Geometry for ImageDataGenerator (the same draw is applied to image and mask).
GEOMETRIC_AUGMENTATION = dict(
    rotation_range=90,
    width_shift_range=0.05,
    height_shift_range=0.05,
    shear_range=10.0,
    zoom_range=0.15,
    horizontal_flip=True,
    vertical_flip=True,
    fill_mode="reflect",
)


# Intensity changes, applied to the image only.
INTENSITY_AUGMENTATION = dict(brightness=0.1, contrast=0.2, gamma=1.3, noise=0.03)


# Stronger intensity changes (and blur) for slices whose brightness, contrast or focus vary.
STRONG_INTENSITY_AUGMENTATION = dict(brightness=0.15, contrast=0.35, gamma=1.6, noise=0.05, blur=1.5)


INTENSITY_AUGMENTATIONS = {"standard": INTENSITY_AUGMENTATION, "strong": STRONG_INTENSITY_AUGMENTATION}


# Only the 8 symmetries of the square (flips, transposes: with them all 90-degree rotations).
# They permute pixels exactly, so tiles keep the slices' texture, which interpolated rotations,
# shears and zooms smooth (a model trained on those meets sharper slices at test time).
DIHEDRAL_AUGMENTATION = dict(horizontal_flip=True, vertical_flip=True, transpose=True, fill_mode="reflect")


GEOMETRIES = {"affine": GEOMETRIC_AUGMENTATION, "dihedral": DIHEDRAL_AUGMENTATION}


# get_random_transform seeds NumPy's global generator; serialise those calls so
# that threaded data loading stays deterministic.
_transform_lock = threading.Lock()


def _image_data_generator(geometry: dict):
    import tensorflow as tf  # only the augmenting code needs TensorFlow

    # ImageDataGenerator has no transpose; augment_pair applies it.
    return tf.keras.preprocessing.image.ImageDataGenerator(**{k: v for k, v in geometry.items() if k != "transpose"})


def augmentation_context(tile_size: int, geometry: dict | None) -> int:
    """Pixels of context around a tile that a transform drawn from ``geometry`` may pull in.

    Enough that a rotated, sheared, zoomed-out or shifted tile stays inside its crop; none
    when the geometry only flips and transposes (or there is none).
    """
    moving = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range")
    return int(math.ceil(tile_size * 0.35)) if geometry and any(geometry.get(key) for key in moving) else 0


def augment_pair(generator, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, intensity: dict | None,
                 transpose: bool = False):
    """One random geometric transform applied to both arrays, intensity to the image only.

    image: (y, x) float32 in [0, 1]; mask: (y, x) uint8 0/1. Returns the same
    shapes and dtypes; the mask is re-binarised after interpolation. ``transpose``:
    half the time both arrays are also transposed (with the generator's flips, every
    90-degree rotation); square arrays only.
    """
    with _transform_lock:
        params = generator.get_random_transform(image.shape + (1,), seed=int(rng.integers(2**31)))
    image = generator.apply_transform(image[..., None], params)[..., 0]
    mask = generator.apply_transform(mask[..., None].astype(np.float32), params)[..., 0]
    if transpose and rng.random() < 0.5:
        image, mask = image.T, mask.T
    if intensity:
        image = jitter_intensity(image, rng, **intensity)
    return image.astype(np.float32), (mask > 0.5).astype(np.uint8)


def jitter_intensity(image, rng, brightness=0.0, contrast=0.0, gamma=1.0, noise=0.0, blur=0.0):
    """Random blur (half the time), gamma, contrast, brightness and Gaussian noise; clipped to [0, 1]."""
    if blur and rng.random() < 0.5:
        from scipy import ndimage

        image = ndimage.gaussian_filter(image, rng.uniform(0.3, blur))
    image = np.clip(image, 0.0, 1.0) ** np.exp(rng.uniform(-np.log(gamma), np.log(gamma)))
    mean = image.mean()
    image = (image - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean + rng.uniform(-brightness, brightness)
    if noise:
        image = image + rng.normal(0.0, rng.uniform(0, noise), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def reflect_to_at_least(array: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, max(0, size - length)) for length in array.shape]
    return np.pad(array, pad, mode="reflect") if any(after for _, after in pad) else array


def random_tile(images, masks, tile_size: int, rng: np.random.Generator, context: int = 0, weights=None):
    """A random (tile + 2*context)-sized crop from a random image, picked by area (or by ``weights``)."""
    areas = np.array([image.size for image in images] if weights is None else weights, dtype=np.float64)
    index = rng.choice(len(images), p=areas / areas.sum())
    size = tile_size + 2 * context
    image = reflect_to_at_least(images[index], size)
    mask = reflect_to_at_least(masks[index], size)
    y = rng.integers(0, image.shape[0] - size + 1)
    x = rng.integers(0, image.shape[1] - size + 1)
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


class TileSampler:
    """What both augmentation engines share: the batch geometry, the seed, and the augmentation
    (``geometry`` and ``intensity`` default to the standard ones; nothing when ``augment`` is off).
    Images are picked by area, or by ``image_weights`` (several datasets sampled fairly).

    A subclass draws batch ``(epoch, index)`` as a pure function of (seed, epoch, index), so a
    run repeats exactly and a resumed run sees the batches the interrupted one would have.
    """

    def __init__(self, tile_size: int, batch_size: int, steps_per_epoch: int, augment: bool = True, seed: int = 0,
                 geometry: dict | None = None, intensity: dict | None = None, image_weights=None):
        self.image_weights = None if image_weights is None else np.asarray(image_weights, np.float64)
        self.tile_size, self.batch_size, self.steps_per_epoch = tile_size, batch_size, steps_per_epoch
        self.augment, self.seed = augment, seed
        self.geometry = dict(GEOMETRIC_AUGMENTATION if geometry is None else geometry) if augment else {}
        self.intensity = dict(INTENSITY_AUGMENTATION if intensity is None else intensity) if augment else {}
        self.context = augmentation_context(tile_size, self.geometry)


class TrainingTiles(TileSampler):
    """Random augmented training tiles, fed to ``model.fit`` as a ``tf.data`` pipeline.

    Batch ``(epoch, index)`` is drawn from its own generator seeded by
    (seed, epoch, index): a pure function of its position in training, so
    runs repeat exactly whatever the number of loading threads, and a resumed
    run sees the very batches the interrupted one would have. Each sample is a
    crop with extra context around the tile; the geometric transform is
    applied to the crop and the centre is kept, so rotations rarely need
    filling.

    A batch is ``(x, y)``: x ``(batch, tile, tile, 1)`` float32 in [0, 1], y the
    matching masks as float32 0/1.
    """

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images, self.masks = list(images), list(masks)
        self.generator = _image_data_generator(self.geometry) if self.augment else None
        self.transpose = bool(self.geometry.get("transpose"))

    def batch(self, epoch: int, index: int, share: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch``; with ``share=(k, n)``, the k-th of n equal parts of it.

        Each part is drawn from its own generator, seeded by (seed, epoch, index, k): replicas
        on different workers get different tiles without exchanging anything.
        """
        rng = np.random.default_rng([self.seed, epoch, index] + ([share[0]] if share else []))
        size = self.batch_size // share[1] if share else self.batch_size
        x = np.empty((size, self.tile_size, self.tile_size, 1), np.float32)
        y = np.empty_like(x)
        for sample in range(size):
            image, mask = random_tile(self.images, self.masks, self.tile_size, rng, self.context, self.image_weights)
            if self.augment:
                image, mask = augment_pair(self.generator, image, mask, rng, self.intensity, self.transpose)
                centre = slice(self.context, self.context + self.tile_size)
                image, mask = image[centre, centre], mask[centre, centre]
            x[sample, ..., 0], y[sample, ..., 0] = image, mask
        return x, y

    def dataset(self, first_epoch: int, epochs: int, workers: int = 1, input_context=None):
        """A tf.data.Dataset of the batches of epochs first_epoch .. epochs - 1, in order.

        ``workers`` threads prepare batches in parallel; the order stays fixed.
        Use with ``fit(..., steps_per_epoch=self.steps_per_epoch, initial_epoch=first_epoch)``.

        On one machine the batches are global batches, which the strategy splits among its
        replicas. With a ``tf.distribute.InputContext`` (``distribute_datasets_from_function``,
        several workers), this worker's pipeline yields only its replicas' parts of each global
        batch, one per-replica batch per element: no two replicas see the same tiles in a step.
        """
        import tensorflow as tf

        steps = self.steps_per_epoch
        replicas = input_context.num_replicas_in_sync if input_context else 1
        if self.batch_size % replicas:
            raise DataError(f"global batch {self.batch_size} does not split evenly among {replicas} replicas")
        local = replicas // input_context.num_input_pipelines if input_context else 1
        first_replica = input_context.input_pipeline_id * local if input_context else 0
        shape = (self.batch_size // replicas, self.tile_size, self.tile_size, 1)

        def make(element):
            step, replica = divmod(int(element), local)
            share = (first_replica + replica, replicas) if input_context else None
            return self.batch(step // steps, step % steps, share)

        def load(element):
            x, y = tf.numpy_function(make, [element], (tf.float32, tf.float32), stateful=False)
            return tf.ensure_shape(x, shape), tf.ensure_shape(y, shape)

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        elements = tf.data.Dataset.range(first_epoch * steps * local, epochs * steps * local)
        return (elements.map(load, num_parallel_calls=max(1, workers), deterministic=True)
                .prefetch(2).with_options(options))


def grid_tiles(images, masks, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every image into non-overlapping tiles (reflect-padded at the edges).

    Deterministic validation data: returns x ``(n, tile, tile, 1)`` float32 and
    y of the same shape (0/1 float32), covering every pixel exactly once.
    """
    xs, ys = [], []
    for image, mask in zip(images, masks):
        rows, cols = (math.ceil(length / tile_size) for length in image.shape)
        pad = [(0, rows * tile_size - image.shape[0]), (0, cols * tile_size - image.shape[1])]
        image, mask = np.pad(image, pad, mode="reflect"), np.pad(mask, pad, mode="reflect")
        for row in range(rows):
            for col in range(cols):
                window = np.s_[row * tile_size : (row + 1) * tile_size, col * tile_size : (col + 1) * tile_size]
                xs.append(image[window])
                ys.append(mask[window])
    return np.stack(xs)[..., None].astype(np.float32), np.stack(ys)[..., None].astype(np.float32)
