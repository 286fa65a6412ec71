"""Adaptation without labels: batch-norm statistics re-estimated on the slices to be predicted."""

import numpy as np
import pytest
import tensorflow as tf

import data
from mito.adaptation import adapt_batchnorm, adaptation_tiles, batchnorm_layers
from mito.errors import ConfigError
from mito.model_files import default_settings
from unet import UNetConfig, build_unet


def batchnorm_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    config = UNetConfig(depth=2, base_filters=4, dropout=0.0, head_filters=0, batch_norm=True)
    return build_unet(config), default_settings(config, scale=0.5)


def shifted_slices(count=3, shape=(200, 260)):
    """EM-like slices of another 'microscope': noise around a bright, low-contrast mean."""
    noise = np.random.default_rng(1)
    return [np.clip(180 + 20 * noise.standard_normal(shape), 0, 255).astype(np.uint8) for _ in range(count)]


def test_the_first_layer_statistics_become_those_of_the_new_slices():
    model, settings = batchnorm_model()
    slices = shifted_slices()
    first = batchnorm_layers(model)[0]
    before = [weight.copy() for weight in model.get_weights()]
    momentum = first.momentum
    tiles = adaptation_tiles(settings, slices, settings.unet.alignment)
    used = adapt_batchnorm(model, settings, slices, batch_size=len(tiles))  # one batch: exact statistics
    assert used == len(tiles) > 1
    # What the first batch-norm layer sees: the output of the convolution before it.
    inputs = tf.keras.Model(model.inputs, first.input)(tiles).numpy()
    np.testing.assert_allclose(first.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), inputs.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert first.momentum == momentum  # restored
    statistics = {id(weight) for layer in batchnorm_layers(model) for weight in
                  (layer.moving_mean, layer.moving_variance)}
    for variable, old in zip(model.weights, before):
        if id(variable) not in statistics:  # weights, biases, gamma and beta are left alone
            np.testing.assert_array_equal(variable.numpy(), old)


def test_batches_are_averaged_alike():
    slices = shifted_slices(count=4)
    results = []
    for batch_size in (4, 100):
        model, settings = batchnorm_model()
        adapt_batchnorm(model, settings, slices, batch_size=batch_size)
        results.append(batchnorm_layers(model)[0].moving_mean.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_tiles_are_what_the_model_reads_and_bounded():
    _, settings = batchnorm_model()
    tiles = adaptation_tiles(settings, [np.zeros((60, 50), np.uint16) + 7, np.arange(120 * 90).reshape(120, 90)],
                             settings.unet.alignment)
    assert tiles.shape[1:] == (24, 24, 1)  # the smallest slice at half scale, on the pooling grid
    assert np.isfinite(tiles).all() and tiles.min() >= 0 and tiles.max() <= 1


def test_a_model_without_batch_norm_is_refused():
    config = UNetConfig(depth=2, base_filters=4, dropout=0.0, head_filters=0, batch_norm=False)
    with pytest.raises(ConfigError, match="no batch-norm layers"):
        adapt_batchnorm(build_unet(config), default_settings(config), shifted_slices(1))


def test_normalisation_is_the_models():
    _, settings = batchnorm_model()
    raw = shifted_slices(1)[0]
    tiles = adaptation_tiles(settings, [raw], settings.unet.alignment)
    expected = data.rescale_image(data.normalize(raw, settings.normalization), 0.5)
    np.testing.assert_allclose(tiles[0, :, :, 0], expected[: tiles.shape[1], : tiles.shape[2]], atol=1e-6)
