"""The lean tile forward pass: the kept output equals the full network's, with the decoder cropped."""

import numpy as np
import pytest

import mito.lean_forward
import mito.model_files
import mito.segmenter
import mito.tiling
import unet
from mito.lean_forward import LeanTilePredictor
from mito.tiling import predict_tiled, predict_whole

CONFIGS = [
    unet.UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal"),
    unet.UNetConfig(depth=3, base_filters=4, dropout=0.5, batch_norm=True, head_filters=0),
    unet.UNetConfig(depth=4, base_filters=2, dropout=0.0, kernel_initializer="he_normal"),
]


def random_model(config, seed=0):
    model = unet.build_unet(config)
    rng = np.random.default_rng(seed)
    # Non-trivial batch-norm statistics, so a skipped or misplaced layer shows.
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) if w.ndim == 1 else w
                       for w in model.get_weights()])
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"depth{c.depth}-bn{c.batch_norm}-head{c.head_filters}")
def test_kept_region_equals_the_full_network_at_the_receptive_field_margin(config):
    model = random_model(config)
    side = 6 * config.alignment + 2 * unet.receptive_field(config)
    side = -(-side // config.alignment) * config.alignment
    margin = unet.receptive_field(config)
    batch = np.random.default_rng(1).random((2, side, side + config.alignment, 1), dtype=np.float32)
    full = mito.segmenter.make_predict_fn(model)(batch)
    lean = LeanTilePredictor(model, config)
    # Inner margins on some sides only, as at an image's edge.
    for needed in [((margin, side - margin), (margin, side + config.alignment - margin)),
                   ((0, side - margin), (margin + 3, side + config.alignment))]:
        crops = lean.crops_for(batch.shape[1:3], needed)
        assert crops[0].max() > 0  # the decoder really was cropped
        result = lean(batch, needed)
        (y0, y1), (x0, x1) = needed
        np.testing.assert_allclose(result[:, y0:y1, x0:x1], full[:, y0:y1, x0:x1], atol=1e-5)
        assert np.isnan(result).any()  # and what was not computed is not passed off as output
    np.testing.assert_array_equal(lean(batch), full)  # nothing needed named: the whole tile


def test_cropping_past_the_decoders_reach_would_show(monkeypatch):
    """Control: crops that ignore the decoder's reach change the kept output, so the test above can fail."""
    config = CONFIGS[0]
    model = random_model(config)
    margin = unet.receptive_field(config)
    side = 96
    batch = np.random.default_rng(2).random((1, side, side, 1), dtype=np.float32)
    full = mito.segmenter.make_predict_fn(model)(batch)
    monkeypatch.setattr(mito.lean_forward, "decoder_reach", lambda config, level: 0)
    result = LeanTilePredictor(model, config)(batch, ((margin, side - margin), (margin, side - margin)))
    core = (slice(None), slice(margin, side - margin), slice(margin, side - margin))
    assert np.abs(result[core] - full[core]).max() > 1e-3


def test_segmenter_tiles_with_the_lean_pass_and_matches_whole_image_prediction():
    config = CONFIGS[2]
    model = random_model(config, seed=4)
    settings = mito.model_files.default_settings(config)
    segmenter = mito.segmenter.Segmenter(model, settings, tile_size=96 + 2 * settings.overlap // 2)
    assert isinstance(segmenter.predict_fn, LeanTilePredictor)
    image = np.random.default_rng(5).random((300, 410), dtype=np.float32)
    assert len(mito.tiling.tile_layout(image.shape, segmenter.tile_size, segmenter.overlap, 16).tiles) == 2
    tiled = predict_tiled(segmenter.predict_fn, image, segmenter.tile_size, segmenter.overlap, config.alignment)
    whole = predict_whole(mito.segmenter.make_predict_fn(model), image, config.alignment)
    assert np.isfinite(tiled).all()
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_a_model_with_other_layer_names_is_predicted_whole_tile():
    import tensorflow as tf

    config = CONFIGS[0]
    inputs = tf.keras.Input((None, None, 1))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs))
    assert not LeanTilePredictor.can_run(model, config)
    assert LeanTilePredictor.can_run(unet.build_unet(config), config)
    segmenter = mito.segmenter.Segmenter(model, mito.model_files.default_settings(config))
    assert not isinstance(segmenter.predict_fn, LeanTilePredictor)


def test_freed_memory_is_kept_for_reuse_where_glibc_allows_it():
    import subprocess
    import sys

    # In a child: the setting is process-wide, and this is what a Segmenter asks for.
    code = "import mito.memory, platform; print(mito.memory.keep_freed_memory(), platform.libc_ver()[0])"
    kept, libc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=mito.segmenter.Path(__file__).parents[1]).stdout.split()
    assert kept == ("True" if libc == "glibc" else "False")
