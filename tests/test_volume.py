"""prediction_mito.py on zarr volumes: blockwise prediction on Dask equals whole-slice prediction, the output is
an OME-Zarr that ome-zarr-py reads with the input's pixel size, an interrupted run resumes, a killed worker's
blocks are redone, and bad volumes are one-line errors.

A module-wide Dask cluster of 2 worker processes on 127.0.0.1 serves the runs that pass ``--scheduler``; one
run starts its own local cluster (``--workers``). Volumes are small (3 slices of 200 x 240 px) and cut into
blocks of 64 px, so every run has dozens of blocks with halos crossing their borders.
"""

import hashlib
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import WorkerPlugin

import mito.demo
import mito.model_files
import mito.segmenter
import mito.blockwise
import prediction_mito
from mito.volume import read_group_attributes

SHAPE = (3, 200, 240)
BLOCK = ["--block-size", "64"]
PIXEL_SIZE = (30.0, 4.0, 4.0)  # nm, z-y-x


def synthetic_volume(shape=SHAPE, seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slices = [mito.demo.synthetic_em_slice(rng, shape[1:])[0] for _ in range(shape[0])]
    return (np.stack(slices).astype(np.uint16) * 200 + 1000)  # 16-bit with an offset: the percentiles matter


def write_ome_zarr(path: Path, volume: np.ndarray, chunks=(1, 64, 64)) -> Path:
    """An OME-NGFF 0.4 image (zarr v2) with one level and a pixel size, written with zarr itself."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("s0", data=volume, chunks=chunks)
    axes = [{"name": axis, "type": "space", "unit": "nanometer"} for axis in "zyx"]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": list(PIXEL_SIZE)}]}]}]
    return path


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def volume():
    return synthetic_volume()


@pytest.fixture(scope="module")
def ome_input(tmp_path_factory, volume):
    return write_ome_zarr(tmp_path_factory.mktemp("input") / "cells.ome.zarr", volume)


@pytest.fixture(scope="module")
def expected(tiny_model, volume):
    """Whole-slice prediction of every slice through the Segmenter: (probabilities, masks 0/255)."""
    model, settings = mito.model_files.load_model(tiny_model)
    segmenter = mito.segmenter.Segmenter(model, settings)
    pairs = [segmenter.segment(page) for page in volume]
    masks = np.stack([mask for _, mask in pairs]).astype(np.uint8) * 255
    assert 0 < masks.mean() < 255  # a mask with objects and background: the comparison can fail
    return np.stack([probability for probability, _ in pairs]), masks


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes of one thread on 127.0.0.1, stopped after the module."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


def predict(input_path, model, output, *options) -> int:
    return prediction_mito.main(["--input", str(input_path), "--model", str(model), "--output", str(output),
                                 *BLOCK, *options])


def test_blockwise_prediction_equals_whole_slices_with_labels_in_an_ome_zarr(tiny_model, ome_input, expected, cluster,
                                                                     tmp_path, capsys):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    before = tree_digest(ome_input)
    output = tmp_path / "out"
    assert predict(ome_input, tiny_model, output, "--scheduler", cluster.scheduler_address, "--save-prob",
                   "--instances", "--labels-3d", "--pixel-size", "4") == 0
    probabilities, masks = expected
    result = zarr.open_group(str(output / "cells.zarr"), mode="r")
    assert result["0"].dtype == np.uint8 and result["0"].chunks == (1, 64, 64)
    np.testing.assert_array_equal(result["0"][:], masks)
    probability = zarr.open_group(str(output / "cells_prob.zarr"), mode="r")["0"][:]
    np.testing.assert_array_equal(probability, np.round(probabilities * 255).astype(np.uint8))
    assert tree_digest(ome_input) == before  # the input is never written to
    assert not (output / ".cells.work").exists()
    # A well-kept reader sees a multiscale image: the pyramid, and the input's pixel size carried over.
    nodes = list(Reader(parse_url(str(output / "cells.zarr")))())
    image = nodes[0]
    assert [level.shape for level in image.data] == [SHAPE, (3, 100, 120)]
    np.testing.assert_array_equal(np.asarray(image.data[1][1]), masks[1].reshape(100, 2, 120, 2).max(axis=(1, 3)))
    datasets = image.metadata["coordinateTransformations"]
    assert datasets[0][0]["scale"] == list(PIXEL_SIZE) and datasets[1][0]["scale"] == [30.0, 8.0, 8.0]
    assert [axis["unit"] for axis in image.metadata["axes"]] == ["nanometer"] * 3
    out = capsys.readouterr().out
    assert "pixel size 30 x 4 x 4 nanometer" in out and "workers: 2" in out
    check_labels(output, masks)
    # A rerun keeps the finished volume.
    assert predict(ome_input, tiny_model, output, "--scheduler", cluster.scheduler_address, "--save-prob") == 0
    assert "Kept the finished" in capsys.readouterr().out


def test_an_interrupted_run_resumes_where_it_stopped(tiny_model, ome_input, expected, cluster, tmp_path, monkeypatch,
                                                     capsys):
    """Interrupted after 5 blocks, the same command (here with its own local worker) finishes only the rest."""
    output = tmp_path / "out"

    def interrupt_after_five(progress):
        progress.update()
        if progress.desc == "predict" and progress.n == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(mito.blockwise, "advance", interrupt_after_five)
    assert predict(ome_input, tiny_model, output, "--scheduler", cluster.scheduler_address, "--prob-dtype", "float16",
                   "--save-prob") == 130
    markers = os.listdir(output / ".cells.work" / "done" / "predict")
    done = len(markers)
    assert {int(part) % 64 for name in markers for part in name.split("-")[1:]} == {0}  # blocks of --block-size 64
    blocks = 3 * 4 * 4  # 64-px blocks of 200 x 240
    assert 5 <= done < blocks
    assert "multiscales" not in read_group_attributes(output / "cells.zarr")  # not finished: no OME metadata yet
    monkeypatch.setattr(mito.blockwise, "advance", lambda progress: progress.update())
    capsys.readouterr()
    assert predict(ome_input, tiny_model, output, "--workers", "1", "--prob-dtype", "float16", "--save-prob") == 0
    captured = capsys.readouterr()
    assert "Resuming the unfinished run" in captured.out and "local cluster, workers: 1" in captured.out
    # Only the unfinished blocks were predicted (blocks running at the interruption may have finished since).
    predicted = int(re.search(r"predict: +0%\S* +\| 0/(\d+)", captured.err).group(1))
    assert 0 < predicted <= blocks - done
    probabilities, masks = expected
    np.testing.assert_array_equal(zarr.open_group(str(output / "cells.zarr"), mode="r")["0"][:], masks)
    probability = zarr.open_group(str(output / "cells_prob.zarr"), mode="r")["0"]
    assert probability.dtype == np.float16
    np.testing.assert_array_equal(probability[:], probabilities.astype(np.float16))


class KillOnce(WorkerPlugin):
    """A worker plugin that SIGKILLs its own worker process when a predict task starts, once in all."""

    name = "kill-once"

    def __init__(self, flag: str):
        self.flag = flag

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("predict-") and not os.path.exists(self.flag):
            Path(self.flag).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_has_its_blocks_redone_and_the_volume_is_identical(tiny_model, ome_input, expected, cluster,
                                                                          tmp_path):
    from distributed import Client

    flag = tmp_path / "killed"
    with Client(cluster.scheduler_address) as client:
        client.register_plugin(KillOnce(str(flag)))
        try:
            # Blocks of 128 px: their halves cover whole 64-px chunks of level 1, which the clean-up pass writes.
            assert predict(ome_input, tiny_model, tmp_path / "out", "--scheduler", cluster.scheduler_address,
                           "--block-size", "128") == 0
        finally:
            client.unregister_worker_plugin(KillOnce.name)
        alive = set(client.run(os.getpid).values())
    assert flag.exists() and int(flag.read_text()) not in alive  # a worker really died in the middle of a block
    result = zarr.open_group(str(tmp_path / "out" / "cells.zarr"), mode="r")
    np.testing.assert_array_equal(result["0"][:], expected[1])
    np.testing.assert_array_equal(result["1"][:], expected[1].reshape(3, 100, 2, 120, 2).max(axis=(2, 4)))
    assert len(result.attrs["multiscales"][0]["datasets"]) == 2


def same_partition(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether two label images split the foreground into the same objects, whatever their numbers."""
    if not np.array_equal(ours > 0, theirs > 0):
        return False
    pairs = np.unique(np.column_stack([ours[ours > 0], theirs[ours > 0]]), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def check_labels(output: Path, masks: np.ndarray) -> None:
    """Per-slice instances and 3D objects are the connected components of the mask, with their tables."""
    import csv

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from scipy import ndimage

    masks = masks > 0
    labels = zarr.open_group(str(output / "cells.zarr" / "labels"), mode="r")
    assert labels.attrs["labels"] == ["instances", "objects3d"]
    instances, objects = labels["instances/0"][:], labels["objects3d/0"][:]
    assert instances.dtype == np.uint32
    for z in range(SHAPE[0]):
        assert same_partition(instances[z], ndimage.label(masks[z], np.ones((3, 3)))[0])
    truth3d, count3d = ndimage.label(masks, np.ones((3, 3, 3)))
    assert same_partition(objects, truth3d) and objects.max() == count3d
    assert count3d < instances.max()  # objects continue across slices: the two labellings differ
    rows = list(csv.DictReader(open(output / "cells_objects3d.csv")))
    assert len(rows) == count3d and sum(int(row["voxels"]) for row in rows) == masks.sum()
    assert float(rows[0]["volume_nm3"]) == int(rows[0]["voxels"]) * 30 * 4 * 4
    # The shape measures are those of the TIFF path, on the whole slice, though each block measures its own.
    from mito.metrics import measure_mitochondria

    whole = {row["label"]: row for z in range(SHAPE[0]) for row in measure_mitochondria(instances[z])}
    rows = list(csv.DictReader(open(output / "cells_instances.csv")))
    assert len(rows) == len(whole) and "_box" not in rows[0]
    for row in rows:
        for column in ("perimeter_px", "major_axis_px", "minor_axis_px", "eccentricity", "solidity"):
            assert float(row[column]) == pytest.approx(whole[int(row["label"])][column], abs=1e-9)
        assert float(row["perimeter_nm"]) == pytest.approx(4 * float(row["perimeter_px"]))
    slices = list(csv.DictReader(open(output / "cells_slices.csv")))
    assert [int(row["count"]) for row in slices] == [ndimage.label(m, np.ones((3, 3)))[1] for m in masks]
    nodes = list(Reader(parse_url(str(output / "cells.zarr" / "labels" / "instances")))())
    assert any(node.load(Label) is not None for node in nodes)  # ome-zarr-py reads it as a label image


def test_a_model_that_knows_its_pixel_size_reads_the_volumes_own(tiny_model, ome_input, volume, cluster, tmp_path,
                                                                 capsys):
    import json
    import shutil

    sized = tmp_path / "sized.h5"  # the tiny model, trained at 8 nm pixels as far as its JSON says
    shutil.copy(tiny_model, sized)
    values = json.loads(tiny_model.with_suffix(".json").read_text()) | {"pixel_size": 8.0}
    sized.with_suffix(".json").write_text(json.dumps(values))
    assert predict(ome_input, sized, tmp_path / "out", "--scheduler", cluster.scheduler_address) == 0
    printed = capsys.readouterr().out
    assert "Pixel size  4 nm, from" in printed and "slices resampled x0.5" in printed
    # Exactly what whole slices give at half scale, with the clean-up sizes in nm² (4 times the pixels).
    model, settings = mito.model_files.load_model(sized)
    segmenter = mito.segmenter.Segmenter(model, settings, scale=0.5,
                                         postprocess={key: value * 4 for key, value in settings.postprocess.items()})
    masks = np.stack([segmenter.segment(page)[1] for page in volume]).astype(np.uint8) * 255
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "cells.zarr"), mode="r")["0"][:], masks)


def test_plain_zarr_v3_2d_arrays_and_named_arrays(tiny_model, volume, expected, cluster, tmp_path, capsys):
    single = zarr.create_array(str(tmp_path / "slice.zarr"), data=volume[0], chunks=(64, 64), zarr_format=3)
    assert single.metadata.zarr_format == 3
    assert predict(tmp_path / "slice.zarr", tiny_model, tmp_path / "out", "--scheduler",
                   cluster.scheduler_address) == 0
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "slice.zarr"), mode="r")["0"][:],
                                  expected[1][:1])
    group = zarr.open_group(str(tmp_path / "pair.zarr"), mode="w", zarr_format=3)
    group.create_array("raw", data=volume[2], chunks=(64, 64))
    group.create_array("truth", data=np.zeros((8, 8), np.uint8))
    capsys.readouterr()
    assert predict(tmp_path / "pair.zarr", tiny_model, tmp_path / "out", "--scheduler",
                   cluster.scheduler_address) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pair.zarr: a group of 2 arrays (raw, truth); choose one with --array" in error[0]
    assert predict(tmp_path / "pair.zarr", tiny_model, tmp_path / "out", "--scheduler", cluster.scheduler_address,
                   "--array", "raw") == 0
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "pair.zarr"), mode="r")["0"][:],
                                  expected[1][2:3])


def test_bad_volumes_and_options_are_one_line_errors(tiny_model, tmp_path, capsys):
    channels = tmp_path / "channels.zarr"
    zarr.create_array(str(channels), data=np.zeros((2, 3, 64, 64), np.uint8), zarr_format=2)
    before = tree_digest(channels)
    runs = {  # exit code 2 from the run, one line naming the file
        "channels.zarr: expected a 2D or z-y-x grayscale volume, got shape (2, 3, 64, 64)": [],
        "channels.zarr: is one array, not a group; leave out --array": ["--array", "s0"],
        "refusing to write into the input volume": ["--output", str(channels / "out")],
    }
    for message, options in runs.items():
        output = [] if "--output" in options else ["--output", str(tmp_path / "out")]
        assert prediction_mito.main(["--input", str(channels), "--model", str(tiny_model), *output, *options]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error
    parser_errors = {  # options that do not fit the input: exit code 2 before anything runs
        "a zarr volume is split among Dask workers instead": [str(channels), "--shard", "1/2"],
        "--overlays work on files and folders": [str(channels), "--overlays"],
        "--adapt-batchnorm works on image files and TIFF stacks, not yet on zarr volumes": [
            str(channels), "--adapt-batchnorm"],
        "--workers, --prob-dtype apply to a zarr volume input": [str(tmp_path), "--workers", "2", "--prob-dtype",
                                                                  "float16"],
    }
    for message, (source, *options) in parser_errors.items():
        with pytest.raises(SystemExit) as exit_code:
            prediction_mito.main(["--input", source, "--model", str(tiny_model), *options])
        assert exit_code.value.code == 2 and message in capsys.readouterr().err
    assert tree_digest(channels) == before


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_slices_of_any_size_are_normalised_exactly_as_whole_slices(dtype, tmp_path):
    """The histogram gives NumPy's percentiles of every pixel, also where sampling would start (> 4 Mpx)."""
    from mito.blockwise import SAMPLE_PIXELS, Job, percentiles_from_histogram, slice_statistics

    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    for size, high in ((1, info.max), (7, 3), (1000, 40), (10_001, info.max)):
        values = rng.integers(info.min, high, size, endpoint=True).astype(dtype)
        offset = int(info.min)
        counts = np.bincount(values.astype(np.int64) - offset, minlength=2 ** (8 * values.itemsize))
        for percentile in (0.0, 1.0, 37.3, 50.0, 99.8, 100.0):
            expected = np.percentile(values.astype(np.float32), percentile)
            assert np.float32(percentiles_from_histogram(counts, offset, [percentile])[0]) == np.float32(expected)
    side = int(np.sqrt(SAMPLE_PIXELS)) + 64  # beyond SAMPLE_PIXELS
    slice_ = (rng.normal(0.4, 0.1, (side, side)) * info.max).clip(info.min, info.max).astype(dtype)
    zarr.create_array(str(tmp_path / "big.zarr"), data=slice_[None], chunks=(1, 512, 512), zarr_format=2)
    job = Job(input=str(tmp_path / "big.zarr"), array=None, work="", mask="", prob=None, prob_dtype="uint8",
              loader=None, shape=(1, side, side), chunks=(1, 512, 512), block=(1, 512, 512), halo=0, cleanup={},
              normalization={"mode": "percentile", "low": 1.0, "high": 99.8})
    stats = slice_statistics(job, 0)
    low, high = np.percentile(slice_.astype(np.float32), [1.0, 99.8])
    assert stats["sampled_every"] == 1
    assert np.float32(stats["low"]) == np.float32(low) and np.float32(stats["scale"]) == np.float32(high - low)


def test_workers_that_cannot_import_the_repository_are_one_line_error(tiny_model, ome_input, tmp_path, capsys):
    """A cluster started by hand outside the checkout (``dask worker`` and ``dask scheduler`` do not look in
    their own folder): first a worker, then the scheduler, cannot import this repository."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    bin_dir = Path(sys.executable).parent
    repository = str(Path(prediction_mito.__file__).resolve().parent)
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], cwd=tmp_path, env=env | {"PYTHONPATH": repository},
                                 stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                              cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        capsys.readouterr()
        assert predict(ome_input, tiny_model, tmp_path / "out", "--scheduler", address) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "1 of 1 Dask workers cannot import this repository" in error[0]
        assert "PYTHONPATH=" in error[0]
        worker.terminate()
        worker.wait(timeout=20)
        scheduler.terminate()  # and one that cannot import it either
        scheduler.wait(timeout=20)
        scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                      str(port), "--no-dashboard"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        time.sleep(3)
        assert predict(ome_input, tiny_model, tmp_path / "out", "--scheduler", address) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "the Dask scheduler cannot import this repository" in error[0]
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
