"""Inputs users really have: NaN pixels, stacks tifffile stores as planes, files whose name lies, instance labels."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from conftest import TINY_TRAINING

import data
import mito.errors
import prediction_mito
import test_mito
import training_mito
from mito.demo import synthetic_em_slice


def em_slice(seed, shape=(300, 300)):
    return synthetic_em_slice(np.random.default_rng(seed), shape)


def test_a_float_slice_with_a_nan_patch_is_segmented_around_it(learned_model, tmp_path, capsys):
    image, truth = em_slice(1)
    slice_ = image.astype(np.float32)
    slice_[100:110, 200:210] = np.nan
    source, output = tmp_path / "slices", tmp_path / "masks"
    source.mkdir()
    tifffile.imwrite(source / "stitched.tif", slice_)
    with pytest.warns(UserWarning, match=r"stitched.tif: 100 NaN or infinite pixels"):
        assert prediction_mito.main(["--input", str(source), "--model", str(learned_model), "--output", str(output),
                                     "--save-prob"]) == 0
    mask = iio.imread(output / "stitched.png") > 0
    probability = tifffile.imread(output / "stitched_prob.tif")
    assert np.isnan(probability[100:110, 200:210]).all() and np.isfinite(probability).sum() == 300 * 300 - 100
    assert not mask[100:110, 200:210].any()
    # Not a silently empty slice: the mitochondria around the patch are found as in the clean slice.
    clean = tmp_path / "clean"
    clean.mkdir()
    tifffile.imwrite(clean / "stitched.tif", image.astype(np.float32))
    assert prediction_mito.main(["--input", str(clean), "--model", str(learned_model), "--output",
                                 str(tmp_path / "clean_masks")]) == 0
    clean_mask = iio.imread(tmp_path / "clean_masks" / "stitched.png") > 0
    assert mask.sum() > 0.9 * clean_mask.sum() > 0
    assert np.mean(mask[:90] == clean_mask[:90]) > 0.99  # far from the patch, nothing changed


def test_a_slice_of_nothing_but_nan_is_refused_in_one_line(learned_model, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "empty.tif", np.full((40, 40), np.nan, np.float32))
    assert prediction_mito.main(["--input", str(tmp_path / "empty.tif"), "--model", str(learned_model),
                                 "--output", str(tmp_path / "out")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert len(error) == 1 and "empty.tif: no finite pixel" in error[0]
    assert not list((tmp_path / "out").glob("*.png"))


def nan_dataset(root):
    """The demo layout at 128 px with a NaN band in one training and the test slice (float32 TIFF)."""
    for index, split in enumerate(("train", "train", "valid", "test")):
        image, mask = em_slice(10 + index, (128, 128))
        image = image.astype(np.float32)
        if index in (0, 3):
            image[:, :12] = np.nan
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / split / "images" / f"{index}.tif", image)
        iio.imwrite(root / split / "labels" / f"{index}.png", mask * 255)
    return root


def test_training_and_scoring_leave_nan_pixels_out(tmp_path, capsys):
    dataset = nan_dataset(tmp_path / "data")
    model = tmp_path / "m.h5"
    assert training_mito.main(["--dataset", str(dataset), "--model", str(model), *TINY_TRAINING]) == 0
    settings = json.loads(model.with_suffix(".json").read_text())
    assert np.isfinite(settings["history"]["loss"]).all()
    assert test_mito.main(["--dataset", str(dataset), "--model", str(model), "--output", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert all(np.isfinite(value) for value in summary["mean"].values())
    # The band has no image, so its labels are background, whatever the file says.
    _, mask = data.load_pair(data.find_pairs(dataset, "test")[0])
    assert not mask[:, :12].any()


@pytest.mark.parametrize("count", [3, 4])
def test_a_stack_of_3_or_4_slices_written_by_tifffile_defaults_is_a_stack(count, learned_model, tmp_path):
    volume = np.stack([em_slice(20 + index, (96, 112))[0] for index in range(count)])
    tifffile.imwrite(tmp_path / "volume.tif", volume)  # stored as one planar RGB(A) page
    with tifffile.TiffFile(tmp_path / "volume.tif") as tiff:
        assert tiff.series[0].axes.startswith("S")
    output = tmp_path / "out"
    with pytest.warns(UserWarning, match=f"volume.tif: {count} samples stored as planes"):
        assert prediction_mito.main(["--input", str(tmp_path / "volume.tif"), "--model", str(learned_model),
                                     "--output", str(output)]) == 0
    masks = tifffile.imread(output / "volume.tif")
    assert masks.shape == (count, 96, 112)
    # Each page is the mask of its own slice.
    single = tmp_path / "single"
    single.mkdir()
    iio.imwrite(single / "one.png", volume[1])
    assert prediction_mito.main(["--input", str(single), "--model", str(learned_model), "--output",
                                 str(tmp_path / "single_out")]) == 0
    np.testing.assert_array_equal(masks[1], iio.imread(tmp_path / "single_out" / "one.png"))


def test_an_interleaved_rgb_tiff_stays_one_colour_image(learned_model, tmp_path):
    rgb = np.repeat(em_slice(30, (64, 80))[0][..., None], 3, axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    data._warned_rgb = False
    with pytest.warns(UserWarning, match="converted to grayscale"):
        assert prediction_mito.main(["--input", str(tmp_path / "rgb.tif"), "--model", str(learned_model),
                                     "--output", str(tmp_path / "out")]) == 0
    assert iio.imread(tmp_path / "out" / "rgb.png").shape == (64, 80)


@pytest.mark.parametrize("written, named", [(".png", ".tif"), (".tif", ".png"), (".jpg", ".tif")])
def test_files_are_read_by_content_not_by_name(written, named, learned_model, tmp_path):
    image = em_slice(40, (70, 90))[0]
    truth = tmp_path / f"truth{written}"
    (tifffile.imwrite(truth, image) if written == ".tif" else iio.imwrite(truth, image))
    lying = tmp_path / "slices" / f"slice{named}"
    lying.parent.mkdir()
    shutil.copy(truth, lying)
    np.testing.assert_array_equal(data.read_image(lying), data.read_image(truth))
    assert prediction_mito.main(["--input", str(lying.parent), "--model", str(learned_model), "--output",
                                 str(tmp_path / "out")]) == 0
    assert iio.imread(tmp_path / "out" / "slice.png").shape == (70, 90)  # the extension chose the output


def labelled(root, label, name="0.png"):
    """A one-slice-per-split dataset whose training label is ``label``."""
    for split in ("train", "valid", "test"):
        image, mask = em_slice(50, (64, 64))
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        iio.imwrite(root / split / "images" / "0.png", image)
        iio.imwrite(root / split / "labels" / "0.png", mask * 255)
    (root / "train" / "labels" / "0.png").unlink()
    target = root / "train" / "labels" / name
    tifffile.imwrite(target, label) if name.endswith(".tif") else iio.imwrite(target, label)
    return root


def test_instance_labels_are_mitochondria_wherever_above_0(tmp_path):
    from skimage.measure import label as connected

    _, mask = em_slice(50, (64, 64))
    instances = connected(mask).astype(np.uint16) * 7  # ids 7, 14, ...: what annotation tools store
    root = labelled(tmp_path / "data", instances, "0.tif")
    mito.errors._noted.discard("instances")  # said once per run: an earlier test may have said it
    with pytest.warns(UserWarning, match=r"0.tif: label values 0 to \d+ read as instance ids"):
        _, loaded = data.load_pair(data.find_pairs(root, "train")[0])
    np.testing.assert_array_equal(loaded, mask)


@pytest.mark.parametrize("label, message", [
    (np.full((64, 64), 0.5, np.float32), "label values such as 0.5 are not whole numbers"),
    (np.full((64, 64), -1, np.int16), "label has negative values such as -1"),
    (np.where(np.eye(64, dtype=bool), np.nan, 1).astype(np.float32), "label has NaN or infinite values"),
])
def test_what_cannot_be_a_mask_is_refused_naming_the_file(label, message, tmp_path, capsys, recwarn):
    root = labelled(tmp_path / "data", label, "0.tif")
    assert training_mito.main(["--dataset", str(root), "--model", str(tmp_path / "m.h5"), *TINY_TRAINING]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train/labels/0.tif: " + message in error[0]
    assert not (tmp_path / "m.h5").exists()


def test_a_stack_with_one_slice_of_nothing_is_refused_however_it_is_read(tmp_path):
    stack = np.ones((3, 20, 20), np.float32)
    stack[1] = np.nan
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(data.DataError, match="stack.tif: slice 1 has no finite pixel"):
        data.read_slices(tmp_path / "stack.tif")
    with pytest.raises(data.DataError, match="stack.tif: slice 1 has no finite pixel"):
        list(data.iter_slices(tmp_path / "stack.tif"))
