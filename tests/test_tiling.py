"""Tile geometry and tiled prediction."""

import numpy as np
import pytest

import data
import unet
from data import DataError, predict_tiled, predict_whole, tile_layout

AWKWARD_SHAPES = [(1, 1), (7, 300), (17, 17), (64, 64), (65, 129), (300, 7), (513, 250)]


def identity(batch):
    return batch.copy()


@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
@pytest.mark.parametrize("tile_size, overlap, align", [(64, 16, 1), (64, 32, 16), (100, 0, 8), (1024, 256, 16)])
def test_identity_through_tiles_reproduces_the_input(shape, tile_size, overlap, align):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.testing.assert_array_equal(predict_tiled(identity, image, tile_size, overlap, align, batch_size=3), image)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_tiles_partition_the_image_and_respect_the_alignment(shape):
    tile_size, overlap, align = 96, 32, 16
    layout = tile_layout(shape, tile_size, overlap, align)
    written = np.zeros(shape, int)
    for tile in layout.tiles:
        written[tile.write] += 1
        assert all(s.start % align == 0 for s in tile.read)  # same pooling grid as the whole image
        kept = [s.stop - s.start for s in tile.keep]
        assert kept == [s.stop - s.start for s in tile.write]
        assert all(s.start >= overlap // 2 for s in tile.keep)  # centre kept, border thrown away
    assert (written == 1).all()
    assert all(side % align == 0 and side <= tile_size for side in layout.tile_shape)
    assert layout.pad[0][0] == layout.pad[1][0] >= overlap // 2


def test_a_tile_too_small_for_its_overlap_is_refused():
    with pytest.raises(DataError, match="too small"):
        tile_layout((100, 100), tile_size=64, overlap=64, align=16)


def test_tiny_unet_tiled_equals_whole_image_at_the_default_overlap():
    config = unet.UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal")
    predict_fn = unet.make_predict_fn(unet.build_unet(config))
    image = np.random.default_rng(3).random((150, 203), dtype=np.float32)
    overlap = unet.default_overlap(config)
    whole = predict_whole(predict_fn, image, overlap // 2, config.alignment)
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
    x, y = data.grid_tiles([image], [mask], 32)
    assert x.shape == (6, 32, 32, 1) and y.shape == x.shape
    rebuilt = np.block([[x[row * 2 + col, ..., 0] for col in range(2)] for row in range(3)])
    np.testing.assert_array_equal(rebuilt[:70, :45], image)
    np.testing.assert_array_equal(y[..., 0] == 1, x[..., 0] > 0.5)
