"""Tile geometry and tiled prediction."""

import numpy as np
import pytest

import unet
from mito.errors import DataError
from mito.tiling import predict_tiled, predict_whole, tile_layout
import mito.augmentation
import mito.cleanup
import mito.model_files
import mito.segmenter
import mito.tiling

AWKWARD_SHAPES = [(1, 1), (7, 300), (17, 17), (64, 64), (65, 129), (300, 7), (513, 250)]


def identity(batch):
    return batch.copy()


@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
@pytest.mark.parametrize("tile_size, overlap, align", [(64, 16, 1), (64, 32, 16), (100, 0, 8), (1024, 256, 16)])
def test_identity_through_tiles_reproduces_the_input(shape, tile_size, overlap, align):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.testing.assert_array_equal(predict_tiled(identity, image, tile_size, overlap, align, batch_size=3), image)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES + [(1024, 1024), (1300, 2100)])
@pytest.mark.parametrize("tile_size, overlap, align", [(96, 32, 16), (100, 0, 8), (1280, 256, 16)])
def test_tiles_partition_the_image_with_margins_only_between_tiles(shape, tile_size, overlap, align):
    layout = tile_layout(shape, tile_size, overlap, align)
    written = np.zeros(shape, int)
    tile_y, tile_x = layout.tile_shape
    for tile in layout.tiles:
        written[tile.write] += 1
        assert all(s.start % align == 0 for s in tile.read)  # same pooling grid as the whole image
        kept = [s.stop - s.start for s in tile.keep]
        assert kept == [s.stop - s.start for s in tile.write]
        for read, keep, side, length in zip(tile.read, tile.keep, layout.tile_shape, shape):
            # A border inside the image is at least overlap // 2 from what is kept; the image's edge is not.
            assert keep.start >= overlap // 2 or read.start == 0
            assert side - keep.stop >= overlap // 2 or read.start + side >= length
    assert (written == 1).all()
    assert all(side % align == 0 for side in layout.tile_shape)
    assert tile_y <= max(tile_size, shape[0] + align) and tile_x <= max(tile_size, shape[1] + align)
    assert all(before == 0 and after < align for before, after in layout.pad)  # only to the alignment


def test_a_slice_that_fits_is_one_tile_and_a_large_one_wastes_little():
    single = tile_layout((1024, 1024), 1280, 256, 16)
    assert single.tile_shape == (1024, 1024) and len(single.tiles) == 1
    large = tile_layout((8192, 8192), 1280, 256, 16)
    computed = len(large.tiles) * large.tile_shape[0] * large.tile_shape[1] / 8192**2
    assert computed < 1.5  # every tile shrunk to what its neighbours need: (8 x 1248 / 8192)**2


def test_a_tile_too_small_for_its_overlap_is_refused():
    with pytest.raises(DataError, match="too small"):
        tile_layout((100, 100), tile_size=64, overlap=64, align=16)


def test_tiny_unet_tiled_equals_whole_image_at_the_default_overlap():
    config = unet.UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal")
    predict_fn = mito.segmenter.make_predict_fn(unet.build_unet(config))
    image = np.random.default_rng(3).random((150, 203), dtype=np.float32)
    overlap = mito.model_files.default_overlap(config)
    whole = predict_whole(predict_fn, image, config.alignment)
    tiled = predict_tiled(predict_fn, image, tile_size=96, overlap=overlap, align=config.alignment, batch_size=4)
    assert whole.std() > 1e-3  # the network's output really varies across the image
    assert len(tile_layout(image.shape, 96, overlap, config.alignment).tiles) > 4
    np.testing.assert_allclose(tiled, whole, atol=1e-3)
    # Control: without overlap the tile borders show, so the comparison above can fail.
    seams = predict_tiled(predict_fn, image, tile_size=96, overlap=0, align=config.alignment)
    assert np.abs(seams - whole).max() > 1e-3


def test_predict_tiled_checks_what_the_function_returns():
    with pytest.raises(ValueError, match="returned shape"):
        predict_tiled(lambda batch: batch[:, :-1], np.zeros((40, 40), np.float32), tile_size=32, overlap=8)


def test_grid_tiles_cover_every_pixel_once():
    rng = np.random.default_rng(4)
    image = rng.random((70, 45), dtype=np.float32)
    mask = (image > 0.5).astype(np.uint8)
    x, y = mito.augmentation.grid_tiles([image], [mask], 32)
    assert x.shape == (6, 32, 32, 1) and y.shape == x.shape
    rebuilt = np.block([[x[row * 2 + col, ..., 0] for col in range(2)] for row in range(3)])
    np.testing.assert_array_equal(rebuilt[:70, :45], image)
    np.testing.assert_array_equal(y[..., 0] == 1, x[..., 0] > 0.5)


def dihedral_average(predict_fn, image):
    """The 8 flips/rotations done by hand, independently of mito.tiling.with_tta."""
    results = []
    for transform, inverse in [
        (lambda a: a, lambda a: a),
        (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
        (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, -2)),
        (lambda a: np.rot90(a, 3), lambda a: np.rot90(a, -3)),
        (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
        (lambda a: np.rot90(a[:, ::-1], 1), lambda a: np.rot90(a, -1)[:, ::-1]),
        (lambda a: np.rot90(a[:, ::-1], 2), lambda a: np.rot90(a, -2)[:, ::-1]),
        (lambda a: np.rot90(a[:, ::-1], 3), lambda a: np.rot90(a, -3)[:, ::-1]),
    ]:
        transformed = np.ascontiguousarray(transform(image))
        results.append(inverse(predict_fn(transformed[None, ..., None])[0, ..., 0]))
    return np.mean(results, axis=0)


def test_tta_inverts_every_flip_and_rotation():
    config = unet.UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal")
    predict_fn = mito.segmenter.make_predict_fn(unet.build_unet(config))
    image = np.random.default_rng(5).random((48, 80), dtype=np.float32)  # not square
    tta = mito.tiling.with_tta(predict_fn)
    averaged = tta(image[None, ..., None])[0, ..., 0]
    assert averaged.shape == image.shape
    np.testing.assert_allclose(averaged, dihedral_average(predict_fn, image), atol=1e-6)
    # Repeatable (to float rounding: oneDNN's kernels may sum in another order for another buffer).
    np.testing.assert_allclose(averaged, tta(image[None, ..., None])[0, ..., 0], atol=1e-6)
    plain = predict_fn(image[None, ..., None])[0, ..., 0]
    assert np.abs(averaged - plain).max() > 1e-4  # the network is not symmetric: TTA changes something
    # A position-dependent function exposes any transform that is not undone: identity stays identity.
    identity = mito.tiling.with_tta(lambda batch: batch * 1.0)
    np.testing.assert_allclose(identity(image[None, ..., None])[0, ..., 0], image, atol=1e-6)
    tiled = predict_tiled(tta, image, tile_size=32, overlap=8, align=4)
    assert tiled.shape == image.shape


def test_postprocess_removes_small_objects_and_fills_small_holes():
    mask = np.zeros((40, 40), bool)
    mask[2:5, 2:5] = True  # 9 px speck
    mask[10:30, 10:30] = True  # 400 px object...
    mask[18:21, 18:21] = False  # ...with a 9 px hole
    mask[32:40, 0:40] = True
    mask[35:37, 5:10] = False  # a 10 px hole
    cleaned = mito.cleanup.postprocess(mask, {"min_size": 10, "max_hole": 9})
    assert not cleaned[2:5, 2:5].any()
    assert cleaned[18:21, 18:21].all()
    assert not cleaned[35:37, 5:10].any()  # larger than max_hole: kept open
    assert cleaned.sum() == mask.sum() - 9 + 9
    np.testing.assert_array_equal(mito.cleanup.postprocess(mask, None), mask)
    np.testing.assert_array_equal(mito.cleanup.postprocess(mask, {"min_size": 0, "max_hole": 0}), mask)


def test_postprocess_tuning_finds_what_removes_false_positives():
    from mito.metrics import tune_postprocess

    truth = np.zeros((60, 60), bool)
    truth[10:40, 10:40] = True
    predicted = truth.copy()
    predicted[50:53, 50:53] = True  # specks the model wrongly found
    predicted[2:4, 50:52] = True
    predicted[20:22, 20:22] = False  # a hole it left
    options, iou = tune_postprocess([predicted], [truth])
    assert iou == 1.0
    assert 9 < options["min_size"] <= 900 and options["max_hole"] >= 4
