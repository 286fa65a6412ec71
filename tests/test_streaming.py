"""Bounded-memory prediction: tiles read without padding the image, stacks streamed slice by slice,
reading and writing overlapped with the model, and lower-precision inference."""

import tracemalloc
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from mito.stack_writer import StackWriter
import data
import prediction_mito
import unet
import mito.errors
import mito.model_files
import mito.segmenter
import mito.streaming
import mito.tiling


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 300), (65, 129)])
def test_a_tile_read_from_the_image_equals_the_window_of_the_padded_image(shape):
    image = np.random.default_rng(0).random(shape)
    for pad in [(0, 0), (5, 9), (40, 3)]:  # wider than the image: mirrored again, like np.pad
        padded = np.pad(image, [(pad[0], 50), (pad[1], 70)], mode="reflect")
        for y0 in range(0, padded.shape[0] - 3, 7):
            for x0 in range(0, padded.shape[1] - 3, 11):
                window = (slice(y0, min(padded.shape[0], y0 + 20)), slice(x0, min(padded.shape[1], x0 + 30)))
                np.testing.assert_array_equal(mito.tiling.read_tile(image, window, pad), padded[window])


def test_tiled_prediction_needs_no_memory_beyond_its_output_and_one_batch():
    image = np.random.default_rng(1).random((1000, 1000), dtype=np.float32)
    output = np.empty_like(image)
    tracemalloc.start()
    mito.tiling.predict_tiled(lambda batch: batch.copy(), image, tile_size=128, overlap=32, align=16, batch_size=2, out=output)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(output, image)
    assert peak < 0.25 * image.nbytes  # a padded copy of the image alone would be more than 1.0


def test_slices_read_one_at_a_time_equal_the_whole_stack(tmp_path):
    rng = np.random.default_rng(2)
    gray = (rng.random((4, 30, 40)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "gray.tif", gray, imagej=True, metadata={"axes": "ZYX"})
    rgb = (rng.random((3, 30, 40, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    iio.imwrite(tmp_path / "one.png", gray[0].astype(np.uint8))
    for name in ("gray.tif", "rgb.tif", "one.png"):
        with warnings.catch_warnings():  # the colour warning (once per run) is tested elsewhere
            warnings.simplefilter("ignore")
            whole = data.read_slices(tmp_path / name)
            streamed = list(data.iter_slices(tmp_path / name))
        assert len(streamed) == len(whole)
        for page, expected in zip(streamed, whole):
            np.testing.assert_array_equal(page, expected)


def test_a_stack_written_slice_by_slice_is_one_imagej_z_stack(tmp_path):
    pages = [np.full((6, 9), index * 50, np.uint8) for index in range(3)]
    writer = StackWriter(tmp_path / "stack.tif", len(pages))
    for page in pages:
        writer.add(page)
    assert not (tmp_path / "stack.tif").exists()  # renamed into place only when complete
    writer.close()
    with tifffile.TiffFile(tmp_path / "stack.tif") as tiff:
        assert tiff.is_imagej and tiff.imagej_metadata["images"] == 3 and tiff.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tiff.asarray(), np.stack(pages))
    rgb = StackWriter(tmp_path / "rgb.tif", 2)
    rgb.add(np.zeros((6, 9, 3), np.uint8))
    rgb.add(np.ones((6, 9, 3), np.uint8))
    rgb.close()
    assert tifffile.imread(tmp_path / "rgb.tif").shape == (2, 6, 9, 3)
    unfinished = StackWriter(tmp_path / "unfinished.tif", 3)
    unfinished.add(pages[0])
    with pytest.raises(ValueError, match="1 slices written, 3 expected"):
        unfinished.close()
    discarded = StackWriter(tmp_path / "discarded.tif", 3)
    discarded.add(pages[0])
    discarded.discard()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rgb.tif", "stack.tif"]  # no partial files


def test_prefetch_keeps_the_order_and_raises_where_the_loop_would():
    assert list(mito.streaming.prefetch(range(50), depth=2)) == list(range(50))

    def failing():
        yield from range(3)
        raise mito.errors.DataError("broken")

    seen = []
    with pytest.raises(mito.errors.DataError, match="broken"):
        for item in mito.streaming.prefetch(failing()):
            seen.append(item)
    assert seen == [0, 1, 2]
    import threading

    before = threading.active_count()
    loop = mito.streaming.prefetch(iter(range(10**9)))
    for item in loop:
        if item == 5:
            break
    assert threading.active_count() == before + 1  # the reader is still waiting for the loop
    loop.close()  # what leaving the loop does once the generator is dropped: the reader stops
    assert threading.active_count() == before


def test_the_overlapped_pipeline_gives_what_slice_by_slice_prediction_gives(tiny_model, tmp_path):
    rng = np.random.default_rng(3)
    stack = (rng.random((3, 90, 130)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    iio.imwrite(tmp_path / "one.png", stack[0])
    output = tmp_path / "out"
    argv = ["--input", str(tmp_path), "--model", str(tiny_model), "--output", str(output), "--save-prob",
            "--threshold", "0.3", "--tile-size", "64", "--overlap", "16", "--batch-size", "3"]
    assert prediction_mito.main(argv) == 0
    model, settings = mito.model_files.load_model(tiny_model)
    segmenter = mito.segmenter.Segmenter(model, settings, tile_size=64, overlap=16, threshold=0.3, batch_size=3)
    serial = np.stack([segmenter.probability(page) for page in stack])
    np.testing.assert_allclose(tifffile.imread(output / "stack_prob.tif"), serial, atol=1e-6)
    np.testing.assert_allclose(tifffile.imread(output / "one_prob.tif"), serial[0], atol=1e-6)
    expected = np.stack([segmenter.mask(page) for page in serial]) * 255
    np.testing.assert_array_equal(tifffile.imread(output / "stack.tif"), expected)
    np.testing.assert_array_equal(iio.imread(output / "one.png"), expected[0])


def test_bfloat16_inference_stays_close_to_float32():
    config = unet.UNetConfig(depth=2, base_filters=4, dropout=0.0, kernel_initializer="he_normal")
    model = unet.build_unet(config)
    image = np.random.default_rng(4).random((1, 64, 96, 1), dtype=np.float32)
    exact = mito.segmenter.make_predict_fn(model)(image)
    low = mito.segmenter.make_predict_fn(mito.segmenter.with_precision(model, config, "bfloat16"))(image)
    assert low.dtype == np.float32 and low.shape == exact.shape
    assert 0 < np.abs(low - exact).max() < 0.02  # really computed in bfloat16, and close
    assert mito.segmenter.with_precision(model, config, "float32") is model
    with pytest.raises(mito.errors.ConfigError, match="precision"):
        mito.segmenter.with_precision(model, config, "int8")
