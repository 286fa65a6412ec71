"""Tiles sized to a memory budget: larger for smaller networks and narrower arithmetic, never below 1280 px,
fewer computed pixels on large slices, and chosen only where neither the model nor --tile-size names a size."""

import dataclasses
import json

import numpy as np
import pytest

import mito.cli
import mito.errors
import mito.model_files
import mito.segmenter
import prediction_mito
from mito.tile_memory import MINIMUM_TILE, TILE_MEMORY_BUDGET, auto_tile_size, forward_bytes
from mito.tiling import tile_layout
from unet import UNetConfig, build_unet


def computed_per_image_pixel(shape, tile, overlap, align) -> float:
    layout = tile_layout(shape, tile, overlap, align)
    return len(layout.tiles) * layout.tile_shape[0] * layout.tile_shape[1] / (shape[0] * shape[1])


@pytest.mark.parametrize("filters", [4, 8, 16, 64])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_tile_is_the_largest_aligned_side_within_the_budget_and_at_least_the_minimum(filters, precision,
                                                                                         batch_norm):
    config = UNetConfig(base_filters=filters, batch_norm=batch_norm)
    side = auto_tile_size(config, precision)
    assert side % config.alignment == 0 and side >= MINIMUM_TILE
    if side > MINIMUM_TILE:
        assert forward_bytes(config, precision, side) <= TILE_MEMORY_BUDGET
        assert forward_bytes(config, precision, side + config.alignment) > TILE_MEMORY_BUDGET


def test_smaller_networks_narrower_arithmetic_and_single_tiles_get_larger_tiles():
    small, large = UNetConfig(base_filters=8, batch_norm=True), UNetConfig(base_filters=64, batch_norm=True)
    assert auto_tile_size(small, "bfloat16") > auto_tile_size(small, "float32") > auto_tile_size(large, "float32")
    assert auto_tile_size(large, "bfloat16") == MINIMUM_TILE  # the faithful U-Net keeps the tiles it had
    assert auto_tile_size(small, "bfloat16", batch_size=2) < auto_tile_size(small, "bfloat16")
    with_norm = UNetConfig(base_filters=16, batch_norm=True)
    assert auto_tile_size(with_norm, "bfloat16") < auto_tile_size(dataclasses.replace(with_norm, batch_norm=False),
                                                                  "bfloat16")


def test_an_8192_px_slice_computes_fewer_pixels_in_tiles_sized_to_memory():
    config = UNetConfig(base_filters=16, dropout=0.0)
    overlap = mito.model_files.default_overlap(config)
    before = computed_per_image_pixel((8192, 8192), MINIMUM_TILE, overlap, config.alignment)
    after = computed_per_image_pixel((8192, 8192), auto_tile_size(config, "bfloat16"), overlap, config.alignment)
    assert after < 1.25 < 1.45 < before


@pytest.fixture(scope="module")
def small_model():
    config = UNetConfig(depth=2, base_filters=4, dropout=0.0, batch_norm=True)
    return build_unet(config), mito.model_files.default_settings(config)


def test_the_segmenter_sizes_tiles_only_where_nothing_names_a_size(small_model):
    model, settings = small_model
    auto = auto_tile_size(settings.unet, "float32")
    assert settings.tile_size is None  # what training writes now
    assert mito.segmenter.Segmenter(model, settings).tile_size == auto
    older = dataclasses.replace(settings, tile_size=1280)  # the JSON of a model trained before
    assert mito.segmenter.Segmenter(model, older).tile_size == 1280
    assert mito.segmenter.Segmenter(model, older, tile_size="auto").tile_size == auto
    assert mito.segmenter.Segmenter(model, settings, tile_size=96).tile_size == 96
    assert "sized to memory" in mito.segmenter.Segmenter(model, settings).describe()


def test_settings_json_keeps_an_open_tile_size_and_refuses_a_bad_one(small_model):
    _, settings = small_model
    values = json.loads(json.dumps(settings.to_json()))
    assert values["tile_size"] is None
    assert mito.model_files.Settings.from_json(values).tile_size is None
    with pytest.raises(mito.errors.ConfigError, match="tile_size='auto'"):
        mito.model_files.Settings.from_json({**values, "tile_size": "auto"})


def test_tile_size_option_takes_auto_or_a_positive_integer():
    assert mito.cli.tile_size("auto") == "auto" and mito.cli.tile_size("512") == 512
    for bad in ("0", "big", "-3"):
        with pytest.raises(Exception, match="positive integer or 'auto'"):
            mito.cli.tile_size(bad)


def test_prediction_tile_size_auto_overrides_an_older_models_1280_and_is_recorded(small_model, tmp_path):
    import imageio.v3 as iio

    model, settings = small_model
    model_path = tmp_path / "older.h5"
    model.save(model_path)
    mito.model_files.write_settings(model_path, dataclasses.replace(settings, tile_size=1280))
    slices = tmp_path / "slices"
    slices.mkdir()
    iio.imwrite(slices / "a.png", np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8))
    for option, expected in (([], 1280), (["--tile-size", "auto"], auto_tile_size(settings.unet, "float32"))):
        output = tmp_path / f"out{len(option)}"
        assert prediction_mito.main(["--input", str(slices), "--model", str(model_path), "--output", str(output),
                                     "--precision", "float32", *option]) == 0
        assert json.loads((output / "prediction.json").read_text())["tile_size"] == expected
