"""Property-based: whatever small image file a user hands in, prediction writes a valid mask for every
slice or exits 2 with one line naming the file; never a traceback, never a half-written output.
The same for label files in training's reader.
"""

import io

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzing tests need requirements-dev.txt (hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import data  # noqa: E402
import prediction_mito  # noqa: E402
from mito.errors import DataError  # noqa: E402

DTYPES = ("uint8", "uint16", "int16", "float32", "bool")
SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# A few dozen files: under a minute in CI, and a fixed seed so that a failure repeats.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    slices = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6]))
    height = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64]))
    width = draw(st.sampled_from([1, 2, 5, 16, 31, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (slices, height, width)
    if dtype == "bool":
        values = rng.random(shape) > 0.5
    elif dtype == "float32":
        values = (rng.random(shape) * 1000).astype(np.float32)
        holes = rng.random(shape) < draw(st.sampled_from([0.0, 0.0, 0.05, 1.0]))
        values[holes] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    return values if slices > 1 else values[0]


def encode(array, suffix, imagej):
    """The file's bytes as a user's tool might write them; None where that writer cannot write this array."""
    buffer = io.BytesIO()
    try:
        if suffix in (".tif", ".tiff"):
            if imagej and array.dtype.kind in "uf" and array.dtype != np.uint32:
                tifffile.imwrite(buffer, array, imagej=True, metadata={"axes": "ZYX" if array.ndim == 3 else "YX"})
            else:
                tifffile.imwrite(buffer, array)
        else:
            if array.ndim != 2:
                return None
            picture = array.astype(np.uint8) * 255 if array.dtype == bool else array
            if picture.dtype not in (np.uint8, np.uint16) or (suffix != ".png" and picture.dtype != np.uint8):
                return None
            iio.imwrite(buffer, picture, extension=suffix)
    except Exception:  # the writer refuses this array: not a file users can have
        return None
    return buffer.getvalue()


@st.composite
def files(draw):
    array = draw(arrays())
    suffix = draw(st.sampled_from(SUFFIXES))
    content = encode(array, suffix, draw(st.booleans()))
    if content is None:
        content = encode(array[0] if array.ndim == 3 else array, ".tif", False)
        suffix = ".tif"
    damage = draw(st.sampled_from(["none", "none", "none", "truncated", "empty", "renamed"]))
    if damage == "truncated":
        content = content[: max(1, len(content) // 3)]
    elif damage == "empty":
        content = b""
    elif damage == "renamed":  # the bytes of one format under the name of another
        suffix = draw(st.sampled_from(SUFFIXES))
    return content, suffix


@FUZZ
@given(file=files())
def test_prediction_writes_a_mask_per_slice_or_one_line_naming_the_file(file, tiny_model, tmp_path_factory, capsys):
    content, suffix = file
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"user{suffix}"
    path.write_bytes(content)
    output = folder / "out"
    code = prediction_mito.main(["--input", str(path), "--model", str(tiny_model), "--output", str(output)])
    error = capsys.readouterr().err
    assert "Traceback" not in error
    written = sorted(item.name for item in output.iterdir() if item.name != "prediction.json") if output.exists() \
        else []
    if code == 0:
        slices = data.read_slices(path)
        mask_path = output / ("user.tif" if len(slices) > 1 else "user.png")
        assert written == [mask_path.name]
        masks = data.read_slices(mask_path)
        assert masks.shape == slices.shape and set(np.unique(masks)) <= {0, 255}
    else:
        assert code == 2, error
        lines = [line for line in error.splitlines() if "error" in line]
        assert len(lines) == 1 and str(path) in lines[0], error
        assert written == []  # nothing half-written, no temporary file left


@FUZZ
@given(file=files())
def test_labels_are_a_mask_or_one_error_naming_the_file(file, tmp_path_factory):
    content, suffix = file
    folder = tmp_path_factory.mktemp("labels")
    path = folder / f"label{suffix}"
    path.write_bytes(content)
    try:
        label = data.read_image(path)
        data.check_label_values(label, path)
    except DataError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    mask = data.binarize_label(label)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, (label > 0).astype(np.uint8))


def test_the_encoder_makes_readable_and_broken_files(tmp_path):
    """The fuzzers' files are not all of one kind: a written stack reads back, its truncation does not."""
    stack = (np.random.default_rng(0).random((3, 8, 8)) * 255).astype(np.uint8)
    whole, cut = tmp_path / "whole.tif", tmp_path / "cut.tif"
    whole.write_bytes(encode(stack, ".tif", True))
    cut.write_bytes(encode(stack, ".tif", True)[:40])
    np.testing.assert_array_equal(data.read_slices(whole), stack)
    with pytest.raises(DataError, match="cut.tif"):
        data.read_slices(cut)
