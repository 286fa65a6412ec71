"""prediction_mito.py on a zarr volume: the Dask cluster (local worker processes or an existing scheduler),
the passes over the blocks with their progress, resuming from the done markers, the pyramid, and the OME-Zarr
metadata written last.

Outputs, in ``--output``: ``<stem>.zarr`` (the mask, 0/255 uint8, a pyramid of levels 0, 1, ...; with
``--instances`` its ``labels/instances``, and with ``--labels-3d`` its ``labels/objects3d``) and, with
``--save-prob``, ``<stem>_prob.zarr``. While a run is unfinished, ``.<stem>.work/`` beside them holds the
thresholded mask, the normalisation statistics and a marker per finished block; it is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from mito.blockwise import (Job, block_side, clean_block, done_blocks, downsample_block, fused_level1,
                            gather_with_progress, network_halo, predict_block, slice_statistics)
from mito.errors import DataError, error_reason
from mito.files import write_json
from mito.volume import (create_array, describe, multiscales, open_volume, output_chunks, pyramid_shapes,
                         read_group_attributes, write_group_attributes)


def output_paths(output: Path, stem: str) -> dict[str, Path]:
    return {"mask": output / f"{stem}.zarr", "prob": output / f"{stem}_prob.zarr", "work": output / f".{stem}.work"}


def predict_volume(args, segmenter, loader) -> int:
    """Predict the zarr volume ``args.input`` blockwise on Dask into OME-Zarr outputs in ``args.output``.

    ``segmenter``: the client's own Segmenter (its settings give halos and threshold); ``loader``: the
    workers' (``mito.volume_model.loader``). Finished blocks of an earlier run of the same command are kept.
    """
    output = Path(args.output)
    _refuse_inside(output, Path(args.input))
    volume = open_volume(args.input, args.array)
    print(describe(volume))
    paths = output_paths(output, volume.stem)
    if args.overwrite:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
    elif "multiscales" in read_group_attributes(paths["mask"]):
        print(f"Kept the finished {paths['mask']} (use --overwrite to redo)")
        return 0
    job = make_job(args, volume, segmenter, loader, paths)
    _check_record(args, job, segmenter, paths["work"])
    create_outputs(job)
    with dask_client(args.scheduler, args.workers) as client:
        stats = statistics(client, job, paths["work"] / "statistics.json")
        pending = sorted(set(job.origins()) - done_blocks(job, "predict"))
        run_tasks(client, "predict", predict_block, job, pending, [stats[z:z + job.block[0]] for z, _, _ in pending])
        pending = sorted(set(job.origins()) - done_blocks(job, "clean"))
        run_tasks(client, "clean", clean_block, job, pending)
        levels = build_pyramid(client, job, paths["mask"])
        labels = []
        if args.instances or args.labels_3d:
            from mito.volume_labels import label_volume

            labels = label_volume(client, gather_with_progress, args, job, volume, paths)
    write_metadata(args, job, volume, segmenter, paths, levels, labels)
    shutil.rmtree(paths["work"], ignore_errors=True)
    print(f"Wrote {paths['mask']}" + (f" and {paths['prob']}" if args.save_prob else ""))
    return 0


def _refuse_inside(output: Path, source: Path) -> None:
    output, source = output.resolve(), source.resolve()
    if output == source or source in output.parents:
        raise DataError(f"{output}: refusing to write into the input volume; choose another --output")


def make_job(args, volume, segmenter, loader, paths) -> Job:
    chunks = output_chunks(volume)
    halo, grid = network_halo(segmenter.overlap, segmenter.align, segmenter.scale)
    block = (chunks[0], *(block_side(chunk, grid, args.block_size) for chunk in chunks[1:]))
    shapes = pyramid_shapes(volume.shape)
    level1 = len(shapes) > 1 and fused_level1(block, chunks, shapes[1])
    return Job(input=str(volume.path), array=args.array, work=str(paths["work"]), mask=str(paths["mask"] / "0"),
               prob=str(paths["prob"] / "0") if args.save_prob else None, prob_dtype=args.prob_dtype, loader=loader,
               shape=volume.shape, chunks=chunks, block=block, halo=halo, cleanup=dict(segmenter.postprocess or {}),
               normalization=dict(segmenter.normalization), level1=str(paths["mask"] / "1") if level1 else None)


def _check_record(args, job: Job, segmenter, work: Path) -> None:
    """Finished blocks are reused only by the same command: the same input, model, settings and blocks."""
    record = {"input": job.input, "array": job.array, "shape": list(job.shape), "block": list(job.block),
              "model": str(Path(args.model).resolve()), "segmenter": segmenter.describe(), "prob": job.prob,
              "prob_dtype": job.prob_dtype, "cleanup": job.cleanup, "normalization": job.normalization,
              "level1": job.level1}  # an unfinished run whose clean-up did not write level 1 is not continued
    path = work / "run.json"
    if path.exists():
        if json.loads(path.read_text()) != record:
            raise DataError(f"{work.parent}: holds an unfinished run of other settings or input; use --overwrite "
                            "to start again")
        print(f"Resuming the unfinished run in {work.parent}")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def create_outputs(job: Job) -> None:
    create_array(Path(job.work) / "thresholded", job.shape, job.chunks, "uint8")
    create_array(Path(job.mask), job.shape, job.chunks, "uint8")
    if job.prob:
        create_array(Path(job.prob), job.shape, job.chunks, job.prob_dtype)
    if job.level1:
        shape = pyramid_shapes(job.shape)[1]
        create_array(Path(job.level1), shape, level_chunks(job.chunks, shape), "uint8")


def level_chunks(chunks, shape) -> tuple:
    return tuple(min(chunk, length) for chunk, length in zip(chunks, shape))


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int):
    """A Dask client: of the scheduler at ``scheduler``, or of a local cluster of ``workers`` processes on
    127.0.0.1, each of one thread (TensorFlow's threads are set by the loader). Prints the dashboard's address."""
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as error:
            raise DataError(f"{scheduler}: no Dask scheduler answers there ({error_reason(error)})") from None
    else:
        dashboard = ":0" if _has_bokeh() else None
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=dashboard, silence_logs=logging.ERROR,
                               env={"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")})
        client = Client(cluster)
    try:
        if scheduler:
            _check_workers_import_us(client, scheduler)
        workers_now = len(client.scheduler_info().get("workers", {}))
        print(f"Dask: {'scheduler ' + scheduler if scheduler else 'local cluster'}, workers: {workers_now}"
              + (f"; dashboard {client.dashboard_link}" if _dashboard_running(client) else ""))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


REPOSITORY = Path(__file__).resolve().parent.parent


# A builtin call, so that the check itself needs nothing of ours where it runs.
_IMPORTS_US = ("__import__('importlib.util').util.find_spec('mito') is not None "
               "and __import__('importlib.util').util.find_spec('unet') is not None")


def _check_workers_import_us(client, scheduler: str) -> None:
    """A DataError when the scheduler or workers of an existing cluster cannot import this repository (the
    scheduler unpickles the task graph, the workers run it), before any task fails with a traceback."""
    if not client.run_on_scheduler(eval, _IMPORTS_US):
        raise DataError(f"{scheduler}: the Dask scheduler cannot import this repository; start it (and the "
                        f"workers) with PYTHONPATH={REPOSITORY}")
    found = client.run(eval, _IMPORTS_US)
    missing = sorted(worker for worker, ok in found.items() if not ok)
    if missing:
        raise DataError(f"{scheduler}: {len(missing)} of {len(found)} Dask workers cannot import this repository "
                        f"(e.g. {missing[0]}); start them with PYTHONPATH={REPOSITORY}")


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _dashboard_running(client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # an old scheduler without the field: say nothing rather than fail
        return False


def statistics(client, job: Job, path: Path) -> list[dict]:
    """The normalisation statistics of every slice (``slice_statistics``), computed once and kept in the work folder."""
    if path.exists():
        return json.loads(path.read_text())
    futures = client.map(slice_statistics, [job] * job.shape[0], range(job.shape[0]),
                         key=[f"statistics-{z}" for z in range(job.shape[0])])
    stats = gather_with_progress(futures, "statistics", "slice")
    write_json(path, stats)
    return stats


def run_tasks(client, name: str, function, job: Job, origins: list, *more) -> None:
    """Run ``function(job, origin, *more)`` for every block origin on the cluster, with a progress bar."""
    if not origins:
        return
    keys = [f"{name}-{z}-{y}-{x}" for z, y, x in origins]
    futures = client.map(function, [job] * len(origins), origins, *more, key=keys)
    gather_with_progress(futures, name, "block")


def build_pyramid(client, job: Job, store: Path) -> int:
    """Levels 1, 2, ... of the mask, each halving y and x; returns how many levels there are (with level 0)."""
    shapes = pyramid_shapes(job.shape)
    first = 2 if job.level1 else 1  # level 1 came with the clean-up pass
    for level, shape in enumerate(shapes[first:], start=first):
        chunks = level_chunks(job.chunks, shape)
        create_array(store / str(level), shape, chunks, "uint8", overwrite=True)
        block = (job.block[0], *(max(chunk, side) for chunk, side in zip(chunks[1:], job.block[1:])))
        origins = [(z, y, x) for z in range(0, shape[0], block[0]) for y in range(0, shape[1], block[1])
                   for x in range(0, shape[2], block[2])]
        futures = client.map(downsample_block, [str(store / str(level - 1))] * len(origins),
                             [str(store / str(level))] * len(origins), origins, [block] * len(origins),
                             key=[f"pyramid{level}-{z}-{y}-{x}" for z, y, x in origins])
        gather_with_progress(futures, f"pyramid level {level}", "block")
    return len(shapes)


def write_metadata(args, job: Job, volume, segmenter, paths, levels: int, labels: list[str]) -> None:
    """The OME-Zarr metadata, last: a reader never sees a multiscale image with a missing level."""
    from mito.volume import level_factors

    provenance = {"model": str(args.model), "input": job.input, "array": job.array, "segmenter": segmenter.describe()}
    if job.prob:
        write_group_attributes(paths["prob"], {"multiscales": multiscales(
            "probability", ["0"], [1], volume.scale, volume.unit), "mito": provenance | {"dtype": job.prob_dtype}})
    if labels:
        write_group_attributes(paths["mask"] / "labels", {"labels": labels})
        for name in labels:
            write_group_attributes(paths["mask"] / "labels" / name, {
                "multiscales": multiscales(name, ["0"], [1], volume.scale, volume.unit),
                "image-label": {"version": "0.4", "source": {"image": "../../"}}})
    write_group_attributes(paths["mask"], {"multiscales": multiscales(
        "mask", [str(level) for level in range(levels)], level_factors(levels), volume.scale, volume.unit),
        "mito": provenance})
