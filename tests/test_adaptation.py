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


# --- --adapt-batchnorm in test_mito.py and prediction_mito.py ------------------------------------

def test_scoring_with_adaptation_differs_and_is_recorded(learned_model, demo_dataset, tmp_path):
    import json

    import test_mito

    summaries = {}
    for name, options in (("plain", []), ("adapted", ["--adapt-batchnorm", "--no-postprocess"]),
                          ("plain_raw", ["--no-postprocess"])):
        output = tmp_path / name
        assert test_mito.main(["--model", str(learned_model), "--dataset", str(demo_dataset), "--output",
                               str(output), *options]) == 0
        summaries[name] = json.loads((output / "summary.json").read_text())
    assert summaries["plain"]["adaptation"] is None
    record = summaries["adapted"]["adaptation"]
    assert record["slices"] == 2 and record["tiles"] > 0 and "AdaBN" in record["method"]
    assert summaries["adapted"]["mean"] != summaries["plain_raw"]["mean"]


def test_prediction_adapts_every_shard_alike_and_records_it(learned_model, demo_dataset, tmp_path):
    import json

    import prediction_mito

    images = demo_dataset / "unlabeled"
    records = []
    for shard in ("1/2", "2/2"):
        output = tmp_path / "adapted"
        assert prediction_mito.main(["--input", str(images), "--model", str(learned_model), "--output",
                                     str(output), "--adapt-batchnorm", "--shard", shard, "--save-prob"]) == 0
        records.append(json.loads((output / f"prediction.shard-{shard.replace('/', '-of-')}.json").read_text()))
    assert records[0]["adaptation"] == records[1]["adaptation"]
    assert records[0]["adaptation"]["slices"] == len(list(images.glob("*.png")))
    plain = tmp_path / "plain"
    assert prediction_mito.main(["--input", str(images), "--model", str(learned_model), "--output", str(plain),
                                 "--save-prob"]) == 0
    assert json.loads((plain / "prediction.json").read_text())["adaptation"] is None
    for path in sorted(plain.glob("*_prob.tif")):
        assert not np.array_equal(data.read_image(path), data.read_image(tmp_path / "adapted" / path.name))


def test_slices_are_sampled_from_images_and_stack_pages(tmp_path):
    import tifffile

    from mito.adaptation import sample_slices

    stack = np.stack([np.full((8, 8), value, np.uint8) for value in range(10)])
    tifffile.imwrite(tmp_path / "a_stack.tif", stack)
    data.write_image(tmp_path / "b.png", np.full((8, 8), 99, np.uint8))
    slices = sample_slices([tmp_path / "a_stack.tif", tmp_path / "b.png"], count=4)
    assert [int(page[0, 0]) for page in slices] == [0, 3, 7, 99]  # 11 slices: 0, 3.3, 6.7, 10
