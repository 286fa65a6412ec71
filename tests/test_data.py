"""Dataset layout, image reading, normalisation and labels."""

import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

import data
from mito.errors import DataError
import mito.demo
import mito.files
import mito.overlay


def write_pair(root, split, stem, image, label, image_suffix=".png"):
    for kind in ("images", "labels"):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
    path = root / split / "images" / f"{stem}{image_suffix}"
    if image_suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, image)
    else:
        iio.imwrite(path, image)
    iio.imwrite(root / split / "labels" / f"{stem}.png", label)


def test_pairs_are_matched_by_stem_across_formats(tmp_path):
    image = np.full((20, 30), 100, np.uint8)
    label = np.zeros((20, 30), np.uint8)
    write_pair(tmp_path, "train", "0002", image, label, ".tif")
    write_pair(tmp_path, "train", "0001", image, label)
    pairs = data.find_pairs(tmp_path, "train")
    assert [(p.image.name, p.label.name) for p in pairs] == [("0001.png", "0001.png"), ("0002.tif", "0002.png")]


def test_missing_partner_is_named(tmp_path):
    write_pair(tmp_path, "train", "0001", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    iio.imwrite(tmp_path / "train" / "images" / "0002.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"0002.png: no matching file in .*labels"):
        data.find_pairs(tmp_path, "train")


@pytest.mark.parametrize("missing", ["root", "split", "labels"])
def test_missing_folders_are_named(tmp_path, missing):
    write_pair(tmp_path, "train", "0001", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    root = tmp_path / "nowhere" if missing == "root" else tmp_path
    split = "valid" if missing == "split" else "train"
    if missing == "labels":
        for file in (tmp_path / "train" / "labels").iterdir():
            file.unlink()
        (tmp_path / "train" / "labels").rmdir()
    with pytest.raises(DataError, match="not found"):
        data.find_pairs(root, split)


def test_empty_images_folder_is_reported(tmp_path):
    for kind in ("images", "labels"):
        (tmp_path / "test" / kind).mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG, TIFF or JPEG images"):
        data.find_pairs(tmp_path, "test")


def test_size_mismatch_is_reported(tmp_path):
    write_pair(tmp_path, "valid", "0001", np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"0001.png: label size \(8, 9\) differs from image size \(8, 8\)"):
        data.load_split(tmp_path, "valid")


@pytest.mark.parametrize(
    "suffix, array",
    [
        (".png", np.arange(256, dtype=np.uint8).reshape(16, 16)),
        (".png", (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)),
        (".tif", (np.arange(256, dtype=np.uint16) * 100).reshape(16, 16)),
        (".tiff", np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)),
    ],
    ids=["png8", "png16", "tif16", "tif-float"],
)
def test_images_are_read_losslessly_in_their_own_dtype(tmp_path, suffix, array):
    path = tmp_path / f"image{suffix}"
    data.write_image(path, array)
    loaded = data.read_image(path)
    assert loaded.dtype == array.dtype
    np.testing.assert_array_equal(loaded, array)


def test_jpeg_and_colour_images_become_2d_grayscale(tmp_path):
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    iio.imwrite(tmp_path / "slice.jpg", gray)
    assert data.read_image(tmp_path / "slice.jpg").shape == (32, 32)
    iio.imwrite(tmp_path / "rgb.png", np.stack([gray] * 3, axis=-1))
    data._warned_rgb = False
    with pytest.warns(UserWarning, match="grayscale"):
        converted = data.read_image(tmp_path / "rgb.png")
    assert converted.shape == (32, 32) and converted.dtype == np.uint8
    assert np.abs(converted.astype(int) - gray).max() <= 1
    tifffile.imwrite(tmp_path / "channel.tif", gray[..., None])
    np.testing.assert_array_equal(data.read_image(tmp_path / "channel.tif"), gray)
    iio.imwrite(tmp_path / "gray_alpha.png", np.stack([gray, np.full_like(gray, 255)], axis=-1))
    np.testing.assert_array_equal(data.read_image(tmp_path / "gray_alpha.png"), gray)


def test_unreadable_files_are_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        data.read_image(broken)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"stack.tif: a stack of 3 slices where one 2D image was expected"):
        data.read_image(stack)
    tifffile.imwrite(stack, np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"stack.tif: expected a 2D grayscale image or a stack"):
        data.read_slices(stack)


def test_normalisation_maps_any_dtype_to_unit_range():
    ramp8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ranged = data.normalize(ramp8, {"mode": "range"})
    assert ranged.dtype == np.float32 and ranged.min() == 0 and ranged.max() == 1
    np.testing.assert_allclose(data.normalize(ramp8.astype(np.uint16) * 4, {"mode": "range"}).max(), 1020 / 65535)
    # Percentile: a dim 12-bit image and a bright 8-bit one look alike after it.
    dim = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16)
    np.testing.assert_allclose(data.normalize(dim), data.normalize(ramp8), atol=1e-6)
    stretched = data.normalize(ramp8)
    assert stretched.dtype == np.float32 and stretched.min() == 0 and stretched.max() == 1
    assert data.normalize(np.full((4, 4), 7, np.uint8)).max() <= 1  # flat images do not divide by zero
    with pytest.raises(DataError, match="unknown normalisation"):
        data.normalize(ramp8, {"mode": "zscore"})


@pytest.mark.parametrize("foreground", [1, 255])
def test_labels_are_binarised_above_zero(foreground, tmp_path):
    label = np.array([[0, foreground], [foreground, 0]], np.uint8)
    np.testing.assert_array_equal(data.binarize_label(label), [[0, 1], [1, 0]])
    write_pair(tmp_path, "train", "0001", np.zeros((2, 2), np.uint8), label)
    _, masks = data.load_pair(data.find_pairs(tmp_path, "train")[0])
    np.testing.assert_array_equal(masks, [[0, 1], [1, 0]])


@pytest.mark.parametrize("values", [[0, 1, 2, 3], [0, 128, 255], [0, 7]])
def test_integer_labels_of_any_values_are_mitochondria_above_zero(values, tmp_path, recwarn):
    label = np.array([values], np.uint8)
    write_pair(tmp_path, "train", "0001", np.zeros_like(label), label)
    _, mask = data.load_pair(data.find_pairs(tmp_path, "train")[0])
    np.testing.assert_array_equal(mask, (label > 0).astype(np.uint8))


def test_outputs_are_written_atomically(tmp_path):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")

    def failing_writer(temporary):
        temporary.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mito.files.atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_demo_dataset_is_deterministic_and_in_our_layout(tmp_path):
    splits = {"train": 1, "valid": 1, "test": 1}
    first = mito.demo.make_demo_dataset(tmp_path / "a", shape=(96, 128), splits=splits)
    second = mito.demo.make_demo_dataset(tmp_path / "b", shape=(96, 128), splits=splits)
    for split in splits:
        pairs = data.find_pairs(first, split)
        image, mask = data.load_pair(pairs[0])
        assert image.shape == (96, 128) and 0 < mask.mean() < 0.5
        assert set(np.unique(iio.imread(pairs[0].label))) <= {0, 255}
        again = data.find_pairs(second, split)[0]
        np.testing.assert_array_equal(iio.imread(pairs[0].image), iio.imread(again.image))
    assert len(data.list_images(first / "unlabeled")) == len(mito.demo.DEMO_UNLABELED_SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mito.demo.make_demo_dataset(first, shape=(96, 128), splits=splits)  # existing files are kept


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stacks_round_trip_as_imagej_tiffs(tmp_path, dtype):
    stack = (np.random.default_rng(0).random((5, 24, 31)) * 200).astype(dtype)
    path = tmp_path / "stack.tif"
    data.write_image(path, stack)
    np.testing.assert_array_equal(data.read_slices(path), stack)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_imagej and tiff.imagej_metadata["images"] == 5  # Fiji opens it as a Z stack
    single = tmp_path / "single.png"
    data.write_image(single, stack[0].astype(np.uint8))
    assert data.read_slices(single).shape == (1, 24, 31)


def test_overlay_draws_outlines_and_tint():
    image = np.full((20, 20), 0.5, np.float32)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    picture = mito.overlay.overlay(image, [(mask, (255, 0, 255))], tint=mask)
    assert picture.shape == (20, 20, 3) and picture.dtype == np.uint8
    assert tuple(picture[5, 10]) == (255, 0, 255)  # the outline
    assert picture[10, 10, 1] > picture[10, 10, 0]  # green tint inside
    assert tuple(picture[0, 0]) == (127, 127, 127)  # untouched outside


def test_gray_palette_labels_read_as_their_values_without_a_colour_warning(tmp_path):
    """Labels saved as palette PNGs with a gray palette (like the real sample's) stay exactly 0/1."""
    from PIL import Image

    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:20] = 1
    picture = Image.fromarray(mask, mode="P")
    picture.putpalette([value for level in range(256) for value in (level, level, level)])
    picture.save(tmp_path / "label.png")
    data._warned_rgb = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label = data.read_image(tmp_path / "label.png")
    np.testing.assert_array_equal(label, mask)
    data.check_label_values(label, tmp_path / "label.png")


def test_resampling_keeps_the_field_of_view_and_comes_back_to_the_slice_size():
    y, x = np.mgrid[0:96, 0:131]
    image = (0.5 + 0.4 * np.sin(y / 9) * np.cos(x / 11)).astype(np.float32)  # smooth, so halving loses little
    half = data.rescale_image(image, 0.5)
    assert half.shape == (48, 66) and half.dtype == np.float32
    back = data.resize_probability(half, image.shape)
    assert back.shape == image.shape and back.dtype == np.float32
    assert np.abs(back - image)[2:-2, 2:-2].max() < 0.03  # the same place, not shifted by half a pixel
    out = np.zeros(image.shape, np.float32)
    assert data.resize_probability(half, image.shape, out) is out and np.array_equal(out, back)
    np.testing.assert_array_equal(data.rescale_image(image, 1), image)

    mask = np.zeros(image.shape, np.uint8)
    mask[20:61, 30:91] = 1
    small = data.rescale_mask(mask, 0.5)
    assert small.shape == half.shape and small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert abs(4 * int(small.sum()) - int(mask.sum())) < 0.05 * mask.sum()  # the area is kept
    assert small[10:30, 15:45].all() and not small[:9].any()
