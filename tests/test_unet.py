"""The U-Net builder, its config, receptive field and persistence."""

import json
import warnings

import numpy as np
import pytest
import tensorflow as tf

import unet
from unet import UNetConfig
from mito.errors import ConfigError, ModelError
import mito.files
import mito.model_files
import mito.segmenter

TINY = UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal")


def test_faithful_defaults_reproduce_the_original_unet():
    model = unet.build_unet()
    # The Keras example (and zhixuhao/unet) of Ronneberger's U-Net has exactly this many.
    assert model.count_params() == 31_031_685
    assert model.input_shape == (None, None, None, 1)
    filters = [model.get_layer(f"enc{level}_conv1").filters for level in range(4)]
    assert filters + [model.get_layer("bottleneck_conv1").filters] == [64, 128, 256, 512, 1024]
    dropouts = {layer.name: layer.rate for layer in model.layers if isinstance(layer, tf.keras.layers.Dropout)}
    assert dropouts == {"enc3_dropout": 0.5, "bottleneck_dropout": 0.5}
    assert model.get_layer("dec0_upconv").kernel_size == (2, 2)
    assert model.get_layer("output").activation.__name__ == "sigmoid"
    assert getattr(model, "optimizer", None) is None  # building does not compile


@pytest.mark.parametrize("shape", [(32, 32), (48, 80)])
def test_fully_convolutional_on_any_aligned_size(shape):
    model = unet.build_unet(TINY)
    output = model(np.random.default_rng(0).random((2, *shape, 1), np.float32)).numpy()
    assert output.shape == (2, *shape, 1)
    assert output.min() >= 0 and output.max() <= 1


def test_options_change_the_architecture():
    model = unet.build_unet(UNetConfig(depth=3, base_filters=8, batch_norm=True, head_filters=0, dropout=0.2))
    names = {layer.name for layer in model.layers}
    assert {"enc0_bn1", "enc2_pool", "bottleneck_dropout", "enc2_dropout"} <= names
    assert "head_conv" not in names and "enc3_pool" not in names


def test_config_round_trips_and_invalid_fields_are_all_named():
    config = UNetConfig(depth=3, base_filters=16, batch_norm=True)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError) as error:
        UNetConfig(depth=0, base_filters=-1, dropout=1.5).validate()
    assert all(name in str(error.value) for name in ("depth=0", "base_filters=-1", "dropout=1.5"))
    with pytest.raises(ConfigError, match="unknown fields"):
        UNetConfig.from_dict({"depth": 2, "filterz": 3})


def measured_reach(config, size=256):
    """Largest distance at which an impulse changes the pre-sigmoid output, over all pooling phases."""
    probe = unet.build_unet(config)
    for weight in probe.weights:  # positive kernels, zero biases: only the impulse lights up
        weight.assign(tf.fill(weight.shape, 0.5 if len(weight.shape) > 1 else 0.0))
    features = tf.keras.Model(probe.input, probe.get_layer("output").input)
    centre, reach = size // 2, 0
    for phase in range(config.alignment):
        impulse = np.zeros((1, size, size, 1), np.float32)
        impulse[0, centre + phase, centre + phase, 0] = 1
        rows, cols = np.nonzero(np.abs(features(impulse).numpy()[0]).sum(-1))
        reach = max(reach, int(np.abs(np.concatenate([rows, cols]) - centre - phase).max()))
    return reach


@pytest.mark.parametrize(
    "config",
    [UNetConfig(depth=1, base_filters=1, head_filters=0), UNetConfig(depth=2, base_filters=1),
     UNetConfig(depth=3, base_filters=1, head_filters=0)],
    ids=["depth1", "depth2-head", "depth3"],
)
def test_receptive_field_matches_the_impulse_response(config):
    assert unet.receptive_field(config) == measured_reach(config)


def test_default_overlap_covers_the_receptive_field_on_the_pooling_grid():
    config = UNetConfig()
    overlap = mito.model_files.default_overlap(config)
    assert overlap // 2 >= unet.receptive_field(config)
    assert (overlap // 2) % config.alignment == 0


def settings_for(config, **changes):
    values = {"unet": config, "normalization": {"mode": "percentile", "low": 1.0, "high": 99.8}, "tile_size": 256,
              "threshold": 0.4}
    return mito.model_files.Settings(**(values | changes))


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    model = unet.compile_unet(unet.build_unet(TINY), loss="bce_dice")
    path = tmp_path / "model.h5"
    mito.model_files.save_model(model, path, settings_for(TINY))
    loaded, settings = mito.model_files.load_model(path)
    image = np.random.default_rng(1).random((1, 64, 96, 1), np.float32)
    np.testing.assert_array_equal(model(image).numpy(), loaded(image).numpy())
    assert settings.threshold == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5", "model.json"]  # no temporary files left


def test_settings_that_do_not_fit_the_model_are_refused(tmp_path):
    path = tmp_path / "model.h5"
    mito.model_files.save_model(unet.build_unet(TINY), path, settings_for(UNetConfig(depth=2, base_filters=8)))
    with pytest.raises(ModelError, match="parameters"):
        mito.model_files.load_model(path)
    mito.files.write_json(path.with_suffix(".json"), {**settings_for(TINY).to_json(), "threshold": 3, "overlap": -1})
    with pytest.raises(ModelError, match="threshold=3.*|overlap=-1"):
        mito.model_files.load_model(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        mito.model_files.load_model(path)


def test_settings_round_trip_through_json_and_name_every_bad_field():
    settings = settings_for(TINY, scale=0.5, postprocess={"min_size": 16, "max_hole": 4}, history={"loss": [0.5]})
    assert mito.model_files.Settings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    assert settings.overlap == mito.model_files.default_overlap(TINY)  # filled in when not given
    bad = {**settings.to_json(), "threshold": 0, "scale": 9, "tile_size": 0, "colour": "red"}
    del bad["normalization"]
    with pytest.raises(ConfigError) as error:
        mito.model_files.Settings.from_json(bad, "old.json")
    message = str(error.value)
    assert message.startswith("old.json: invalid settings:")
    for part in ("unknown field 'colour'", "normalization: missing", "threshold=0", "scale=9", "tile_size=0"):
        assert part in message
    # Written before scale and clean-up existed: both take their neutral values.
    old = {key: value for key, value in settings.to_json().items() if key not in ("scale", "postprocess", "format")}
    assert mito.model_files.Settings.from_json(old).scale == 1.0
    assert mito.model_files.Settings.from_json(old).postprocess == {"min_size": 0, "max_hole": 0}


def test_missing_settings_fall_back_to_defaults_with_a_warning(tmp_path):
    path = tmp_path / "model.h5"
    mito.model_files.save_model(unet.build_unet(TINY), path)
    with pytest.warns(UserWarning, match="default settings"):
        _, settings = mito.model_files.load_model(path)
    assert settings.unet.depth == 2 and settings.threshold == 0.5
    assert settings.overlap == mito.model_files.default_overlap(TINY)


def test_non_model_files_are_refused(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"this is not HDF5")
    with pytest.raises(ModelError, match="bogus.h5: not a loadable Keras model"):
        mito.model_files.load_model(bogus)
    with pytest.raises(ModelError, match="not found"):
        mito.model_files.load_model(tmp_path / "missing.h5")


def test_compile_offers_the_named_losses():
    for loss in unet.LOSSES:
        model = unet.compile_unet(unet.build_unet(TINY), learning_rate=1e-3, loss=loss)
        x = np.random.default_rng(2).random((2, 32, 32, 1), np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logs = model.train_on_batch(x, (x > 0.5).astype(np.float32), return_dict=True)
        assert np.isfinite(logs["loss"]) and "iou" in logs
    with pytest.raises(ConfigError):
        unet.compile_unet(unet.build_unet(TINY), loss="hinge")


def test_a_model_trained_at_half_scale_predicts_at_half_scale_and_answers_at_full_size(tmp_path):
    model = unet.build_unet(TINY)
    segmenter = mito.segmenter.Segmenter(model, settings_for(TINY, scale=0.5))
    seen = []

    def identity(batch):
        seen.append(batch.shape)
        return batch

    segmenter.predict_fn = identity
    y, x = np.mgrid[0:75, 0:122]
    image = (0.5 + 0.4 * np.sin(y / 8) * np.cos(x / 10)).astype(np.float32)
    probability = segmenter.probability_of_normalized(image)
    assert probability.shape == image.shape and probability.dtype == np.float32
    assert all(max(shape[1:3]) <= 64 for shape in seen)  # the network saw the half-size slice
    assert np.abs(probability - image)[2:-2, 2:-2].max() < 0.03
    assert "resampled x0.5" in segmenter.describe()

    path = tmp_path / "model.h5"
    for bad in (0, -1, 5, "half", True):
        mito.model_files.save_model(model, path, settings_for(TINY, scale=bad))
        with pytest.raises(ModelError, match="scale="):
            mito.model_files.load_model(path)
