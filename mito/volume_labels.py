"""Labelled mitochondria of a volume's mask, out of core: per-slice instances (8-connected in each slice) and
3D connected components (26-connected), each with its table.

Labelling runs blockwise on the Dask cluster in four passes: each block labels its core (SciPy), the blocks'
labels are shifted to be unique, each block reports which labels touch across its borders (its core read with
a 1-px margin), the client joins those (connected components of the touch graph) and each block is renumbered
1..N. Memory per task is one block; the client holds one number per label. Labels are numbered across the
volume (uint32, 0 is background), so a slice's instances do not restart at 1 as they do for TIFF stacks.
The tables have one row per object: its voxels, the slices it spans, its centroid, physical sizes when
the pixel size is known, and for the per-slice instances the shape measures of the TIFF path (perimeter, axes,
eccentricity, solidity). (dask-image's ``ndmeasure.label`` was tried first: see benchmarks/EXPERIMENTS.md.)
"""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path

import numpy as np

from mito.files import atomic_write
from mito.volume import create_array, open_output

def structure(kind: str) -> np.ndarray:
    """Connectivity: 8 neighbours in the slice for 'instances', the 26 neighbours in z-y-x for 'objects3d'."""
    element = np.zeros((3, 3, 3), bool)
    if kind == "instances":
        element[1] = True
    else:
        element[:] = True
    return element


def label_volume(client, gather, args, job, volume, paths) -> list[str]:
    """Label the finished mask (``job.mask``) into ``<mask>/labels/<kind>/0`` and write ``<stem>_<kind>.csv``
    (and ``<stem>_slices.csv`` for the instances); returns the label images written. ``gather(futures, name,
    unit)`` waits for tasks with a progress bar (``mito.blockwise.gather_with_progress``)."""
    run = functools.partial(_run, client, gather)
    kinds = [kind for kind, wanted in (("instances", args.instances), ("objects3d", args.labels_3d)) if wanted]
    spacing, unit = physical_spacing(args.pixel_size, volume)
    origins = job.origins()
    for kind in kinds:
        target = str(paths["mask"] / "labels" / kind / "0")
        create_array(Path(target), job.shape, job.chunks, "uint32", overwrite=True)
        count = len(origins)
        counts = run(f"label {kind}", label_block, [job.mask] * count, [target] * count, origins,
                      [job.block] * count, [kind] * count)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        run(f"number {kind}", shift_block, [target] * count, origins, [job.block] * count, offsets)
        pairs = run(f"join {kind}", touching_labels, [target] * count, origins, [job.block] * count,
                     [kind] * count)
        table = Path(job.work) / f"{kind}-renumbering.npy"
        np.save(table, renumbering(int(sum(counts)), pairs))
        run(f"renumber {kind}", renumber_block, [target] * count, origins, [job.block] * count,
             [str(table)] * count)
        rows = measure(client, target, job.shape, job.chunks, spacing, unit)
        if kind == "instances":
            add_shape_measures(client, gather, target, rows, job.block, spacing, unit)
        for row in rows:
            del row["_box"]
        write_csv(Path(args.output) / f"{volume.stem}_{kind}.csv", rows)
        print(f"Labelled {len(rows)} {'mitochondria in their slices' if kind == 'instances' else '3D objects'}: "
              f"{paths['mask'] / 'labels' / kind}, {Path(args.output) / f'{volume.stem}_{kind}.csv'}")
        if kind == "instances":
            write_csv(Path(args.output) / f"{volume.stem}_slices.csv", slice_table(rows, job.shape))
    return kinds


def _run(client, gather, name: str, function, *arguments) -> list:
    return gather(client.map(function, *arguments, pure=False), name, "block")


def _window(origin, block, shape, margin: int = 0):
    return tuple(slice(max(0, start - margin), min(length, start + side + margin))
                 for start, side, length in zip(origin, block, shape))


def label_block(mask: str, target: str, origin, block, kind: str) -> int:
    """Label one block's core on its own (1..n); returns n."""
    from scipy import ndimage

    labels_array = open_output(target)
    window = _window(origin, block, labels_array.shape)
    labels, count = ndimage.label(np.asarray(open_output(mask)[window]) > 0, structure(kind))
    labels_array[window] = labels.astype(np.uint32)
    return int(count)


def shift_block(target: str, origin, block, offset: int) -> None:
    """Add the labels of all blocks before this one, so that every label in the volume is unique."""
    labels_array = open_output(target)
    window = _window(origin, block, labels_array.shape)
    labels = np.asarray(labels_array[window])
    labels[labels > 0] += np.uint32(offset)
    labels_array[window] = labels


def touching_labels(target: str, origin, block, kind: str) -> np.ndarray:
    """(k, 2) pairs of different labels that touch (under ``kind``'s connectivity) in the core plus 1 px: the
    joins across this block's borders."""
    labels_array = open_output(target)
    labels = np.asarray(labels_array[_window(origin, block, labels_array.shape, margin=1)])
    offsets = [offset for offset in np.argwhere(structure(kind)) - 1 if tuple(offset) > (0, 0, 0)]
    pairs = []
    for offset in offsets:
        here = tuple(slice(max(0, -d), labels.shape[axis] - max(0, d)) for axis, d in enumerate(offset))
        there = tuple(slice(max(0, d), labels.shape[axis] - max(0, -d)) for axis, d in enumerate(offset))
        a, b = labels[here], labels[there]
        touching = (a > 0) & (b > 0) & (a != b)
        if touching.any():
            pairs.append(np.unique(np.column_stack([a[touching], b[touching]]), axis=0))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint32)


def renumbering(count: int, pairs: list) -> np.ndarray:
    """New number (1..N, 0 for background) of each of ``count`` unique labels, joining those that touch."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    joins = np.concatenate([part for part in pairs if len(part)] or [np.zeros((0, 2))]).astype(np.int64)
    graph = coo_matrix((np.ones(len(joins)), (joins[:, 0], joins[:, 1])), shape=(count + 1, count + 1))
    _, component = connected_components(graph, directed=False)
    # Number the components in order of their first label, so the result does not depend on the blocks' order.
    _, first = np.unique(component[1:], return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(1, len(first) + 1)
    table = np.zeros(count + 1, np.uint32)
    table[1:] = order[np.unique(component[1:], return_inverse=True)[1]]
    return table


def renumber_block(target: str, origin, block, table: str) -> None:
    labels_array = open_output(target)
    window = _window(origin, block, labels_array.shape)
    labels_array[window] = np.load(table, mmap_mode="r")[np.asarray(labels_array[window])]


def physical_spacing(pixel_size: float | None, volume):
    """(z, y, x) spacing and unit for the tables: ``--pixel-size`` in nm for y-x (z in proportion to the
    input's own spacing), else the input's OME pixel size and unit, else None."""
    if pixel_size:
        z, y, x = volume.scale
        return (z / x * pixel_size, pixel_size, pixel_size), "nm"
    if volume.unit:
        return volume.scale, volume.unit
    return None, None


COLUMNS = 11  # of a partial-sums row: label, voxels, sums of z, y, x, then min and max of z, y and x


def _partial_sums(block: np.ndarray, origin: tuple[int, int, int]) -> np.ndarray:
    """Per label of one block: [label, voxels, sum z, sum y, sum x, min z, max z, min y, max y, min x, max x]
    (float64 rows)."""
    flat = block.ravel()
    present = flat > 0
    if not present.any():
        return np.zeros((0, COLUMNS))
    coordinates = np.indices(block.shape).reshape(3, -1)[:, present] + np.asarray(origin)[:, None]
    labels, inverse, counts = np.unique(flat[present], return_inverse=True, return_counts=True)
    sums = [np.bincount(inverse, weights=axis, minlength=len(labels)) for axis in coordinates]
    extremes = []
    for axis in coordinates:
        low, high = np.full(len(labels), np.inf), np.full(len(labels), -np.inf)
        np.minimum.at(low, inverse, axis)
        np.maximum.at(high, inverse, axis)
        extremes += [low, high]
    return np.column_stack([labels, counts, *sums, *extremes])


def _read_sums(path: str, origin, shape):
    import zarr

    window = tuple(slice(start, start + side) for start, side in zip(origin, shape))
    return _partial_sums(np.asarray(zarr.open_array(path, mode="r")[window]), origin)


def measure(client, path: str, shape, chunks, spacing, unit: str | None) -> list[dict]:
    """One row per label of the zarr array at ``path``, from per-chunk sums (on the cluster) reduced here."""
    origins = [(z, y, x) for z in range(0, shape[0], chunks[0]) for y in range(0, shape[1], chunks[1])
               for x in range(0, shape[2], chunks[2])]
    parts = client.gather(client.map(_read_sums, [path] * len(origins), origins, [chunks] * len(origins)))
    table = np.concatenate([part for part in parts if len(part)] or [np.zeros((0, COLUMNS))])
    if not len(table):
        return []
    ids, inverse = np.unique(table[:, 0], return_inverse=True)
    totals = np.zeros((len(ids), 4))
    np.add.at(totals, inverse, table[:, 1:5])
    lows, highs = np.full((len(ids), 3), np.inf), np.full((len(ids), 3), -np.inf)
    np.minimum.at(lows, inverse, table[:, 5::2])
    np.maximum.at(highs, inverse, table[:, 6::2])
    rows = []
    for index, label in enumerate(ids):
        voxels = totals[index, 0]
        row = {"label": int(label), "z_first": int(lows[index, 0]), "z_last": int(highs[index, 0]),
               "voxels": int(voxels), "centroid_z": totals[index, 1] / voxels,
               "centroid_y": totals[index, 2] / voxels, "centroid_x": totals[index, 3] / voxels,
               "_box": (*lows[index].astype(int).tolist(), *(highs[index].astype(int) + 1).tolist())}
        if spacing:
            row[f"volume_{unit}3"] = voxels * float(np.prod(spacing))
            row[f"area_{unit}2"] = voxels * spacing[1] * spacing[2] / (row["z_last"] - row["z_first"] + 1)
        rows.append(row)
    return rows


SHAPE_COLUMNS = {"perimeter_px": "perimeter", "major_axis_px": "major_axis", "minor_axis_px": "minor_axis",
                 "eccentricity": None, "solidity": None}


def add_shape_measures(client, gather, path: str, rows: list[dict], block, spacing, unit: str | None) -> None:
    """Perimeter, axes, eccentricity and solidity of each per-slice instance, as the TIFF path measures them
    (``mito.metrics.measure_mitochondria``), added to its row. Each instance is measured by the task of the
    block where its bounding box starts, which reads the union of its instances' boxes in their slice: memory
    per task is a block and the instances that reach out of it."""
    groups: dict[tuple, list] = {}
    for row in rows:
        z, y, x = row["_box"][:3]
        groups.setdefault((z, y // block[1], x // block[2]), []).append(row)
    tasks = [[(row["label"], row["_box"]) for row in members] for members in groups.values()]
    results = gather(client.map(_shape_task, [path] * len(tasks), tasks, pure=False), "measure instances", "block")
    measured = {label: values for result in results for label, values in result.items()}
    for row in rows:
        for column, name in SHAPE_COLUMNS.items():
            row[column] = measured[row["label"]][column]
            if spacing and name:
                row[f"{name}_{unit}"] = row[column] * spacing[2]


def _shape_task(path: str, instances: list) -> dict:
    import zarr

    from mito.metrics import measure_mitochondria

    boxes = np.array([box for _, box in instances])
    z, y0, x0 = boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].min()
    y1, x1 = boxes[:, 4].max(), boxes[:, 5].max()
    window = np.asarray(zarr.open_array(path, mode="r")[z, y0:y1, x0:x1])
    wanted = np.array([label for label, _ in instances], window.dtype)
    window[~np.isin(window, wanted)] = 0  # other instances that reach into the window are another task's
    return {row["label"]: row for row in measure_mitochondria(window)}


def slice_table(rows: list[dict], shape) -> list[dict]:
    """Per slice: how many instances, the mitochondrial area fraction and the mean size (px)."""
    areas = [[] for _ in range(shape[0])]
    for row in rows:
        areas[row["z_first"]].append(row["voxels"])
    return [{"slice": z, "count": len(sizes), "area_fraction": sum(sizes) / (shape[1] * shape[2]),
             "mean_area_px": float(np.mean(sizes)) if sizes else 0.0} for z, sizes in enumerate(areas)]


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["label"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda temporary: temporary.write_text(table.getvalue()))
