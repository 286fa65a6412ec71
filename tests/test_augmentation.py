"""Paired augmentation keeps image and mask aligned; training tiles are reproducible."""

import numpy as np
import pytest
from scipy import ndimage

import mito.augmentation
import mito.errors
import mito.fast_augmentation


def smooth_image(seed, shape=(96, 96)):
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 4)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def agreement(image, mask):
    """Fraction of pixels where the mask still equals 'image > 0.5'."""
    return float(np.mean((image > 0.5) == (mask > 0)))


@pytest.mark.parametrize("seed", range(5))
def test_image_and_mask_get_the_same_transform(seed):
    image = smooth_image(seed)
    mask = (image > 0.5).astype(np.uint8)  # the mask is derived from the image...
    generator = mito.augmentation._image_data_generator(mito.augmentation.GEOMETRIC_AUGMENTATION)
    rng = np.random.default_rng(seed)
    out_image, out_mask = mito.augmentation.augment_pair(generator, image, mask, rng, intensity=None)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
    assert not np.array_equal(out_image, image)  # something happened
    # ...and stays derived from it, up to interpolation at the edges of the mask.
    assert agreement(out_image, out_mask) > 0.98


def test_the_alignment_check_detects_desynchronised_transforms():
    image = smooth_image(11)
    mask = (image > 0.5).astype(np.uint8)
    generator = mito.augmentation._image_data_generator(mito.augmentation.GEOMETRIC_AUGMENTATION)
    scores = []
    for seed in range(5):
        out_image, _ = mito.augmentation.augment_pair(generator, image, mask, np.random.default_rng(seed), None)
        _, other_mask = mito.augmentation.augment_pair(generator, image, mask, np.random.default_rng(seed + 100), None)
        scores.append(agreement(out_image, other_mask))
    assert min(scores) < 0.9


def test_intensity_changes_touch_the_image_only():
    image = smooth_image(5)
    mask = (image > 0.5).astype(np.uint8)
    no_geometry = mito.augmentation._image_data_generator({})
    rng = np.random.default_rng(0)
    out_image, out_mask = mito.augmentation.augment_pair(no_geometry, image, mask, rng, mito.augmentation.INTENSITY_AUGMENTATION)
    np.testing.assert_array_equal(out_mask, mask)
    assert np.abs(out_image - image).mean() > 0.01
    assert out_image.min() >= 0 and out_image.max() <= 1


def batch(augment, epoch=0, seed=1):
    rng = np.random.default_rng(0)
    images = [rng.random((150, 130), dtype=np.float32), rng.random((60, 50), dtype=np.float32)]
    masks = [(image > 0.7).astype(np.uint8) for image in images]
    tiles = mito.augmentation.TrainingTiles(images, masks, tile_size=64, batch_size=3, steps_per_epoch=4, augment=augment, seed=seed)
    return tiles.batch(epoch, 2)


@pytest.mark.parametrize("augment", [False, True])
def test_training_batches_have_the_promised_shapes_and_are_reproducible(augment):
    x, y = batch(augment)
    assert x.shape == y.shape == (3, 64, 64, 1)
    assert x.dtype == y.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(x, batch(augment)[0])
    assert not np.array_equal(x, batch(augment, epoch=1)[0])
    assert not np.array_equal(x, batch(augment, seed=2)[0])


def test_plain_tiles_are_exact_crops_with_their_masks():
    x, y = batch(augment=False)
    # Without augmentation the mask is exactly the thresholded image (image > 0.7).
    np.testing.assert_array_equal(y > 0, x > 0.7)


def keras_tiles():
    rng = np.random.default_rng(0)
    images = [rng.random((90, 90), dtype=np.float32)]
    return mito.augmentation.TrainingTiles(images, [(images[0] > 0.5).astype(np.uint8)], 32, 2, steps_per_epoch=3, seed=4)


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_the_dataset_yields_each_epochs_batches_in_order_whatever_the_threads(engine):
    tiles = keras_tiles() if engine == "keras" else fast_tiles(mito.augmentation.STRONG_INTENSITY_AUGMENTATION)
    for workers in (1, 3):
        batches = list(tiles.dataset(first_epoch=1, epochs=3, workers=workers).as_numpy_iterator())
        assert len(batches) == 6
        for step, (x, y) in enumerate(batches):
            expected_x, expected_y = tiles.batch(1 + step // 3, step % 3)
            np.testing.assert_array_equal(x, expected_x)
            np.testing.assert_array_equal(y, expected_y)


# --- the fast path (FastTrainingTiles: tf.data, vectorised, XLA) ---------------------


def fast_tiles(intensity=None, augment=True, seed=3):
    """Shared per setting: each new object compiles its XLA function (seconds)."""
    key = (tuple(sorted(intensity.items())) if intensity is not None else None, augment, seed)
    if key not in _FAST_TILES:
        _FAST_TILES[key] = make_fast_tiles(intensity, augment, seed)
    return _FAST_TILES[key]


_FAST_TILES = {}


def make_fast_tiles(intensity=None, augment=True, seed=3, batch_size=4, tile_size=48):
    rng = np.random.default_rng(1)
    masks = [(smooth_image(seed, shape) > 0.5).astype(np.uint8) for seed, shape in ((1, (120, 100)), (2, (40, 50)))]
    images = [mask * np.float32(0.8) + np.float32(0.1) for mask in masks]  # the image is a function of the mask
    if intensity is not None:
        images = [np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1).astype(np.float32) for image in images]
    return mito.fast_augmentation.FastTrainingTiles(images, masks, tile_size=tile_size, batch_size=batch_size, steps_per_epoch=3,
                                  augment=augment, seed=seed, intensity=intensity)


@pytest.mark.parametrize("intensity", [None, mito.augmentation.INTENSITY_AUGMENTATION, mito.augmentation.STRONG_INTENSITY_AUGMENTATION])
def test_fast_batches_have_the_promised_shapes_dtypes_and_ranges(intensity):
    x, y = fast_tiles(intensity).batch(0, 1)
    assert x.shape == y.shape == (4, 48, 48, 1)
    assert x.dtype == y.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and set(np.unique(y)) <= {0.0, 1.0}
    assert 0 < y.mean() < 1


def test_fast_geometry_moves_image_and_mask_together():
    tiles = fast_tiles(intensity={})  # geometry only: the image stays mask * 0.8 + 0.1
    changed = 0
    for index in range(3):
        x, y = tiles.batch(0, index)
        assert np.mean((x > 0.5) == (y > 0.5)) > 0.99  # all but a thin interpolation border
        changed += not np.allclose(x, np.round((x - 0.1) / 0.8) * 0.8 + 0.1)  # interpolated: really transformed
    assert changed
    # the check can fail: the masks of another batch do not fit
    other_x, _ = tiles.batch(1, 0)
    assert np.mean((other_x > 0.5) == (y > 0.5)) < 0.95


def test_fast_plain_tiles_are_exact_crops_with_their_masks():
    x, y = fast_tiles(augment=False).batch(0, 0)
    np.testing.assert_array_equal(x, y * np.float32(0.8) + np.float32(0.1))


def test_fast_intensity_changes_touch_the_image_only():
    tiles = fast_tiles(intensity=mito.augmentation.STRONG_INTENSITY_AUGMENTATION)
    x, y = tiles.batch(0, 0)
    assert np.mean((x > 0.5) == (y > 0.5)) > 0.8  # still mostly aligned, but jittered
    assert not np.allclose(x, y * 0.8 + 0.1, atol=0.05)


def test_fast_batches_are_a_function_of_seed_epoch_and_index():
    tiles = fast_tiles(mito.augmentation.STRONG_INTENSITY_AUGMENTATION)
    x, y = tiles.batch(2, 1)
    again = make_fast_tiles(mito.augmentation.STRONG_INTENSITY_AUGMENTATION).batch(2, 1)  # a new object, as a resumed run makes
    np.testing.assert_array_equal(x, again[0])
    np.testing.assert_array_equal(y, again[1])
    assert not np.array_equal(x, tiles.batch(2, 2)[0])
    assert not np.array_equal(x, tiles.batch(3, 1)[0])
    assert not np.array_equal(x, fast_tiles(mito.augmentation.STRONG_INTENSITY_AUGMENTATION, seed=4).batch(2, 1)[0])


def test_fast_path_refuses_geometry_it_does_not_implement():
    with pytest.raises(ValueError, match="fast augmentation"):
        mito.fast_augmentation.FastTrainingTiles([np.zeros((64, 64), np.float32)], [np.zeros((64, 64), np.uint8)], 32, 2, 1,
                               geometry={**mito.augmentation.GEOMETRIC_AUGMENTATION, "fill_mode": "constant"})


def test_the_fast_dataset_refuses_several_machines_with_a_message():
    import tensorflow as tf

    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0, num_replicas_in_sync=2)
    with pytest.raises(mito.errors.DataError, match="--augmentation-engine keras"):
        fast_tiles().dataset(0, 1, 1, context)
    x, y = next(iter(fast_tiles().dataset(0, 1, 1, tf.distribute.InputContext())))  # one machine is fine
    first_x, first_y = fast_tiles().batch(0, 0)
    np.testing.assert_array_equal(x, first_x)
    np.testing.assert_array_equal(y, first_y)


# --- the dihedral geometry (--geometry dihedral): exact flips and 90-degree rotations -----


def symmetries(array):
    """The 8 symmetries of a square array (axes 0 and 1)."""
    for turned in (array, np.swapaxes(array, 0, 1)):
        for flipped in (turned, turned[::-1], turned[:, ::-1], turned[::-1, ::-1]):
            yield flipped


def symmetry_of_a_crop(tile, mask_tile, source, source_mask):
    """Which of the 8 symmetries turns ``tile`` and ``mask_tile`` back into a crop of the sources (None if none).

    ``source`` encodes each pixel's position in its value, so the tile's corner names the crop.
    """
    height, width = source.shape
    size = tile.shape[0]
    for number, (image, mask) in enumerate(zip(symmetries(tile), symmetries(mask_tile))):
        top, left = divmod(int(np.rint(image[0, 0] * height * width)), width)
        crop = (slice(top, top + size), slice(left, left + size))
        if source[crop].shape == image.shape and np.array_equal(image, source[crop]):
            np.testing.assert_array_equal(mask, source_mask[crop])
            return number
    return None


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_dihedral_tiles_are_exact_crops_flipped_or_turned_with_their_masks(engine):
    height, width, tile_size = 40, 44, 32  # crops often touch the last row and column
    source = (np.arange(height * width, dtype=np.float32) / (height * width)).reshape(height, width)
    source_mask = (np.random.default_rng(0).random((height, width)) < 0.3).astype(np.uint8)
    tiles_class = mito.fast_augmentation.FastTrainingTiles if engine == "fast" else mito.augmentation.TrainingTiles
    tiles = tiles_class([source], [source_mask], tile_size, batch_size=8, steps_per_epoch=4, seed=5,
                        geometry=mito.augmentation.DIHEDRAL_AUGMENTATION, intensity={})
    assert mito.augmentation.augmentation_context(tile_size, mito.augmentation.DIHEDRAL_AUGMENTATION) == 0
    found = []
    for index in range(4):
        x, y = tiles.batch(0, index)
        for tile, mask_tile in zip(x[..., 0], y[..., 0]):
            found.append(symmetry_of_a_crop(tile, mask_tile.astype(np.uint8), source, source_mask))
    assert None not in found  # every tile is an exact crop, flipped or turned, never interpolated
    assert set(found) == set(range(8))  # and all 8 symmetries occur


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_an_empty_geometry_moves_nothing_in_either_engine(engine):
    height, width, tile_size = 40, 44, 32
    source = (np.arange(height * width, dtype=np.float32) / (height * width)).reshape(height, width)
    source_mask = (np.random.default_rng(0).random((height, width)) < 0.3).astype(np.uint8)
    tiles_class = mito.fast_augmentation.FastTrainingTiles if engine == "fast" else mito.augmentation.TrainingTiles
    tiles = tiles_class([source], [source_mask], tile_size, batch_size=8, steps_per_epoch=2, seed=5,
                        geometry={}, intensity={})
    x, y = tiles.batch(0, 0)
    found = {symmetry_of_a_crop(tile, mask_tile.astype(np.uint8), source, source_mask)
             for tile, mask_tile in zip(x[..., 0], y[..., 0])}
    assert found == {0}  # unflipped, unturned exact crops, as with geometry=None for no augmentation
