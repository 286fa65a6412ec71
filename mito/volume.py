"""EM volumes in Zarr: opening an OME-Zarr image or a plain zarr array (v2 or v3, 2D or z-y-x) for reading,
and the OME-Zarr outputs (mask with its pyramid, probability, instance labels) with their metadata.

Nothing here loads a whole volume: callers read and write windows. The input is opened read-only.
Outputs follow OME-NGFF 0.4 on zarr format 2, which napari (napari-ome-zarr), Fiji (MoBIE, n5-viewer)
and ome-zarr-py read; their ``multiscales`` metadata is written last, once every array is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np

from mito.errors import DataError, error_reason

NGFF_VERSION = "0.4"
SPATIAL = ("z", "y", "x")
# y-x chunk sides of the outputs: the input's, within these bounds (huge chunks would make huge blocks).
MIN_CHUNK, MAX_CHUNK = 64, 4096
MAX_CHUNK_DEPTH = 4  # slices per output chunk (and per block) in z


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a zarr store (v2 or v3 group or array) on disk: a folder with zarr metadata."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


@dataclasses.dataclass
class Volume:
    """A read-only EM volume in a zarr store, seen as (z, y, x) whatever its stored axes.

    ``scale`` is the pixel size per axis (z, y, x) in ``unit`` (None: unknown, ones), from the OME metadata.
    """

    path: Path
    name: str  # the array's path inside the store ('' for a bare array)
    array: object  # zarr.Array, stored axes may have leading singleton axes (t, c)
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str | None = None

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".zarr").removesuffix(".ome") or "volume"

    def read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        """The window (z, y, x) as a NumPy array in the stored dtype; DataError naming the file if unreadable."""
        lead = (0,) * (self.array.ndim - 3) if self.array.ndim >= 3 else ()
        try:
            if self.array.ndim == 2:
                return np.asarray(self.array[y, x])[None][: z.stop - z.start]
            return np.asarray(self.array[(*lead, z, y, x)])
        except Exception as error:  # zarr and its codecs raise many types for damaged chunks
            raise DataError(f"{self.path}: cannot read {self.name or 'the array'} at z {z.start}..{z.stop - 1} "
                            f"({error_reason(error)})") from None


def _open(path: Path):
    import zarr

    if not is_zarr(path):
        raise DataError(f"{path}: not a zarr store (no .zgroup, .zarray or zarr.json in the folder)")
    try:
        return zarr.open(str(path), mode="r")
    except Exception as error:
        raise DataError(f"{path}: not a readable zarr store ({error_reason(error)})") from None


def _ome_attributes(node) -> dict:
    attrs = dict(node.attrs)
    return attrs.get("ome", attrs)  # OME-NGFF 0.5 nests its keys under "ome"


def _arrays(group, prefix: str = "") -> list[str]:
    """Paths of every array in a group, depth first (for the error that asks to choose one)."""
    import zarr

    found = []
    for key, member in group.members():
        if isinstance(member, zarr.Array):
            found.append(prefix + key)
        elif not key.startswith("."):
            found.extend(_arrays(member, prefix + key + "/"))
    return found


def open_volume(path: str | Path, name: str | None = None) -> Volume:
    """Open ``path`` (an OME-Zarr image, a group of arrays, or one array) for reading.

    An OME-Zarr image gives its full-resolution level unless ``name`` picks another dataset path; a plain
    group needs ``name`` when it holds more than one array. Raises DataError naming the file and the problem.
    """
    import zarr

    path = Path(path)
    node = _open(path)
    multiscale, scale, unit = None, None, None
    if isinstance(node, zarr.Group):
        multiscale = (_ome_attributes(node).get("multiscales") or [None])[0]
        if name is None and multiscale:
            name = multiscale["datasets"][0]["path"]
        if name is None:
            arrays = sorted(_arrays(node))
            if len(arrays) != 1:
                raise DataError(f"{path}: a group of {len(arrays)} arrays ({', '.join(arrays[:8]) or 'none'}); "
                                "choose one with --array")
            name = arrays[0]
        try:
            array = node[name]
        except KeyError:
            names = ", ".join(sorted(_arrays(node))[:8])
            raise DataError(f"{path}: no array {name!r} in the group (arrays: {names})") from None
        if not isinstance(array, zarr.Array):
            return _nested(path, name, array)
    else:
        if name:
            raise DataError(f"{path}: is one array, not a group; leave out --array")
        array, name = node, ""
    axes = _axis_names(multiscale, array.ndim)
    if multiscale:
        scale, unit = _ome_scale(multiscale, name, axes)
    return _as_zyx(path, name, array, axes, scale, unit)


def _nested(path: Path, name: str, group) -> Volume:
    """``--array`` named a group: an OME-Zarr image inside a bigger store (bioformats2raw's '0', say)."""
    multiscale = (_ome_attributes(group).get("multiscales") or [None])[0]
    if not multiscale:
        raise DataError(f"{path}: {name!r} is a group, not an array; name an array inside it with --array")
    level = multiscale["datasets"][0]["path"]
    array = group[level]
    axes = _axis_names(multiscale, array.ndim)
    scale, unit = _ome_scale(multiscale, level, axes)
    return _as_zyx(path, f"{name}/{level}", array, axes, scale, unit)


def _axis_names(multiscale, ndim: int) -> list[str]:
    if multiscale and multiscale.get("axes"):
        axes = [axis["name"] if isinstance(axis, dict) else axis for axis in multiscale["axes"]]
        if len(axes) == ndim:
            return [str(axis).lower() for axis in axes]
    return ["t", "c", "z", "y", "x"][-ndim:] if ndim <= 5 else [f"d{index}" for index in range(ndim)]


def _ome_scale(multiscale: dict, level: str, axes: list[str]):
    """(pixel size per z, y, x, unit) of dataset ``level`` from its (and the image's) scale transformations."""
    factors = np.ones(len(axes))
    for holder in [*(d for d in multiscale["datasets"] if d["path"] == level), multiscale]:
        for transform in holder.get("coordinateTransformations", []):
            if transform.get("type") == "scale" and len(transform.get("scale", [])) == len(axes):
                factors = factors * np.asarray(transform["scale"], float)
    units = {axis["name"]: axis.get("unit") for axis in multiscale.get("axes", []) if isinstance(axis, dict)}
    scale = [float(factors[axes.index(axis)]) if axis in axes else 1.0 for axis in SPATIAL]
    return tuple(scale), units.get("x") or units.get("y")


def _as_zyx(path: Path, name: str, array, axes: list[str], scale, unit) -> Volume:
    """The array seen as (z, y, x): 2D is one slice; leading axes other than z, y, x must have length 1."""
    shape = tuple(array.shape)
    where = f"{path}" + (f" ({name})" if name else "")
    extra = [(axis, length) for axis, length in zip(axes, shape) if axis not in SPATIAL and length != 1]
    if array.ndim < 2 or extra or array.ndim > 5:
        raise DataError(f"{where}: expected a 2D or z-y-x grayscale volume, got shape {shape} (axes "
                        f"{''.join(axes)}); channels or time points other than one are not supported")
    if array.dtype.kind not in "uif":
        raise DataError(f"{where}: unsupported pixel type {array.dtype}")
    if 0 in shape:
        raise DataError(f"{where}: empty array of shape {shape}")
    chunks = tuple(array.chunks)
    if array.ndim == 2:
        shape3, chunks3 = (1, *shape), (1, *chunks)
    else:
        shape3, chunks3 = shape[-3:], chunks[-3:]
    return Volume(path, name, array, shape3, chunks3, scale or (1.0, 1.0, 1.0), unit)


def output_chunks(volume: Volume) -> tuple[int, int, int]:
    """Chunks of the outputs: the input's in y-x (within MIN_CHUNK..MAX_CHUNK), 1 to MAX_CHUNK_DEPTH slices in z."""
    depth = max(1, min(volume.chunks[0], MAX_CHUNK_DEPTH))
    return (depth, *(max(MIN_CHUNK, min(chunk, MAX_CHUNK, length)) if length >= MIN_CHUNK else length
                     for chunk, length in zip(volume.chunks[1:], volume.shape[1:])))


def pyramid_shapes(shape: tuple[int, int, int], smallest: int = 128) -> list[tuple[int, int, int]]:
    """Level shapes of the mask pyramid: each halves y and x (rounding down) until both fit in ``smallest``."""
    shapes = [tuple(shape)]
    while max(shapes[-1][1:]) > smallest and min(shapes[-1][1:]) >= 2:
        z, y, x = shapes[-1]
        shapes.append((z, y // 2, x // 2))
    return shapes


def create_array(store: Path, shape, chunks, dtype, overwrite: bool = False):
    """A zarr-format-2 array (Blosc zstd), opened for writing; an existing one is reopened unless ``overwrite``."""
    import zarr

    if store.exists() and not overwrite:
        return zarr.open_array(str(store), mode="r+")
    from numcodecs import Blosc

    return zarr.create_array(str(store), shape=shape, chunks=chunks, dtype=dtype, zarr_format=2,
                             compressors=Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
                             fill_value=0, overwrite=True,
                             chunk_key_encoding={"name": "v2", "separator": "/"})


@functools.lru_cache(maxsize=16)
def open_output(path: str):
    """An output array opened for writing, once per process (each Dask worker writes many blocks)."""
    import zarr

    return zarr.open_array(path, mode="r+")


NANOMETRES_PER_UNIT = {"picometer": 1e-3, "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6}


def pixel_size_nm(volume: Volume) -> float | None:
    """The y-x pixel size in nm from the OME metadata; None without a length unit or with unequal y and x."""
    factor = NANOMETRES_PER_UNIT.get(volume.unit)
    if factor is None or volume.scale[1] != volume.scale[2]:
        return None
    return volume.scale[2] * factor


def multiscales(name: str, levels: list[str], factors: list[int], scale, unit: str | None) -> list[dict]:
    """The OME-NGFF 0.4 ``multiscales`` attribute of a z-y-x image: one dataset per level, each ``factors[i]``
    times coarser in y and x than the pixel size ``scale`` (z, y, x)."""
    axes = [{"name": axis, "type": "space", **({"unit": unit} if unit else {})} for axis in SPATIAL]
    datasets = [{"path": level, "coordinateTransformations": [
        {"type": "scale", "scale": [scale[0], scale[1] * factor, scale[2] * factor]}]}
        for level, factor in zip(levels, factors)]
    return [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets}]


def write_group_attributes(store: Path, attributes: dict) -> None:
    """Make ``store`` a zarr-format-2 group (if it is not) and set its attributes, each file written atomically."""
    from mito.files import write_json

    store.mkdir(parents=True, exist_ok=True)
    if not (store / ".zgroup").exists():
        write_json(store / ".zgroup", {"zarr_format": 2})
    write_json(store / ".zattrs", attributes)


def read_group_attributes(store: Path) -> dict:
    try:
        return json.loads((store / ".zattrs").read_text())
    except (OSError, ValueError):
        return {}


def level_factors(count: int) -> list[int]:
    return [2**level for level in range(count)]


def describe(volume: Volume) -> str:
    unit = f" {volume.unit}" if volume.unit else ""
    size = math.prod(volume.shape) / 1e9
    return (f"{volume.path}{f' ({volume.name})' if volume.name else ''}: {volume.shape[0]} slices of "
            f"{volume.shape[1]} x {volume.shape[2]} px ({size:.3g} GVoxel, {volume.dtype}), chunks {volume.chunks}, "
            f"pixel size {' x '.join(f'{s:g}' for s in volume.scale)}{unit}")
