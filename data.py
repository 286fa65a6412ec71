"""Dataset layout and pairing, image and TIFF-stack I/O, normalisation, label binarisation, resampling.

Layout of a dataset root::

    <root>/{train,valid,test}/images/NNNN.png   EM slices (PNG, TIFF or JPEG, 8/16-bit)
    <root>/{train,valid,test}/labels/NNNN.png   masks: 0 background, anything > 0 mitochondria (0/1, 0/255, ids)

Images and labels are paired by file stem, so ``images/0001.tif`` pairs with
``labels/0001.png``.

Arrays: a 2D image is ``(y, x)``; a batch is ``(n, y, x, 1)`` float32 in [0, 1];
masks are ``(y, x)`` uint8 in {0, 1}.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from mito.errors import DataError, error_reason, note_once  # noqa: E402
from mito.files import atomic_write  # noqa: E402

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_NORMALIZATION = {"mode": "percentile", "low": 1.0, "high": 99.8}
# A model may see slices resampled (its settings' "scale"): 0.5 halves each side, 4 is the most enlargement.
MAX_SCALE = 4.0


# --- files --------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files (PNG/TIFF/JPEG, any case) in ``folder``, sorted by path."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if is_image_file(path))


_warned_rgb = False


def _to_grayscale(image: np.ndarray, path: Path) -> np.ndarray:
    """Drop alpha; turn RGB into luminance (once-per-run warning), keeping integer dtypes."""
    global _warned_rgb
    if image.shape[-1] in (1, 2):  # gray, or gray + alpha
        return image[..., 0]
    if not _warned_rgb:
        warnings.warn(f"{path}: colour image converted to grayscale (and so are any others)", stacklevel=3)
        _warned_rgb = True
    luminance = image[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    return np.round(luminance).astype(image.dtype) if image.dtype.kind in "ui" else luminance.astype(np.float32)


def _gray_palette_mode(path: Path) -> str | None:
    """'L' for a palette PNG whose colours are all grays (how many tools save 0/1 labels), else None.

    Reading such a file as gray values keeps labels 0/1 exact and avoids a spurious colour warning.
    """
    from PIL import Image

    with Image.open(path) as picture:
        if picture.mode != "P":
            return None
        palette = picture.getpalette() or []
    colours = zip(palette[0::3], palette[1::3], palette[2::3])
    return "L" if all(red == green == blue for red, green, blue in colours) else None


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def is_tiff(path: Path) -> bool:
    """Whether the file's bytes are a TIFF, whatever its name says (files are read by content)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) in _TIFF_MAGIC
    except OSError:
        return path.suffix.lower() in TIFF_SUFFIXES


def _tiff_series(tiff, path: Path):
    """The first series of a TIFF and whether its last axis holds colour samples.

    Several samples stored as planes (axes 'SYX', what ``tifffile.imwrite`` makes of a 3- or
    4-slice volume without metadata) are a stack of slices in EM, which is gray by nature:
    read as such, with a one-line note. Interleaved samples ('YXS') stay a colour image.
    """
    series = tiff.series[0]
    planar = series.axes.startswith("S") and not (tiff.is_imagej or tiff.is_ome)
    if planar:
        note_once(f"{path}: {series.shape[0]} samples stored as planes without ImageJ/OME metadata, read as a "
                   f"stack of {series.shape[0]} slices", f"planar {path}")
    return series, series.axes.endswith("S")


def read_slices(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image or a TIFF stack as ``(slices, y, x)`` in the file's own dtype.

    A 2D image gives one slice; a multi-page TIFF (or an ImageJ Z/T stack, or planes of
    samples) gives one slice per page. RGB(A) becomes grayscale with a one-time warning.
    The format is read from the file's bytes, not its name. Non-finite pixels (NaN, inf)
    are reported once per file. Raises DataError naming the file when it cannot be read
    or has other axes.
    """
    path = Path(path)
    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tiff:
                series, has_channels = _tiff_series(tiff, path)
                image = series.asarray()
        else:
            image = iio.imread(path, plugin="pillow", mode=_gray_palette_mode(path))
            has_channels = image.ndim == 3
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:  # every reader raises its own types for bad files
        reason = error_reason(error)
        raise DataError(f"{path}: not a readable image ({reason})") from None
    image = np.asarray(image)
    if has_channels and image.shape[-1] in (1, 2, 3, 4):
        image = _to_grayscale(image, path)
    elif image.ndim == 3 and image.shape[-1] == 1:  # (y, x, 1) saved without a samples axis
        image = image[..., 0]
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or 0 in image.shape:
        raise DataError(f"{path}: expected a 2D grayscale image or a stack of them, got an array of shape {image.shape}")
    stack = len(image) > 1
    warn_non_finite(path, sum(count_non_finite(page, path, index if stack else None)
                              for index, page in enumerate(image)))
    return image


def count_non_finite(page: np.ndarray, path, index: int | None = None) -> int:
    """How many NaN or infinite pixels a slice has; DataError naming the file (and slice) when it has
    no finite pixel at all.

    The rule everywhere: such pixels are left out of the normalisation statistics and filled for
    the network (``normalize``), predicted as background with probability NaN (the Segmenter), and
    training takes their labels as background.
    """
    if page.dtype.kind != "f":
        return 0
    count = int(page.size - np.count_nonzero(np.isfinite(page)))
    if count == page.size:
        where = f"slice {index} has " if index is not None else ""
        raise DataError(f"{path}: {where}no finite pixel (all NaN or infinite)")
    return count


def warn_non_finite(path, count: int) -> None:
    """One warning line naming the file, when ``count`` of its pixels are NaN or infinite."""
    if count:
        warnings.warn(f"{path}: {count} NaN or infinite pixels: left out of the normalisation, predicted as "
                      "background (probability NaN there)", stacklevel=3)




def count_slices(path: str | os.PathLike) -> int:
    """How many slices ``read_slices`` would return, from the file header only."""
    path = Path(path)
    if not is_tiff(path):
        return 1
    try:
        with tifffile.TiffFile(path) as tiff:
            series, _ = _tiff_series(tiff, path)
            shape, axes = series.shape, series.axes
    except Exception as error:  # tifffile raises many types for bad files
        reason = error_reason(error)
        raise DataError(f"{path}: not a readable image ({reason})") from None
    if axes.endswith("S"):
        shape = shape[:-1]
    return shape[0] if len(shape) == 3 and shape[-1] != 1 else 1


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one 2D grayscale image ``(y, x)`` in its own dtype (uint8, uint16, float...).

    Raises DataError naming the file when it cannot be read or is a stack.
    """
    slices = read_slices(path)
    if len(slices) != 1:
        raise DataError(f"{path}: a stack of {len(slices)} slices where one 2D image was expected "
                        "(prediction accepts stacks; training and test need one slice per file)")
    return slices[0]


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an image atomically: TIFF through tifffile, PNG/JPEG through imageio.

    A 3D array ``(slices, y, x)`` becomes a multi-page ImageJ TIFF (a Z stack
    in Fiji and napari).
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        rgb_stack = np.ndim(image) == 4
        stack = rgb_stack or (np.ndim(image) == 3 and np.shape(image)[-1] not in (3, 4))
        axes = "ZYXS" if rgb_stack else "ZYX"
        options = {"imagej": True, "metadata": {"axes": axes}} if stack else {"compression": "zlib"}
        if stack and np.asarray(image).dtype not in (np.uint8, np.uint16, np.float32):
            image = np.asarray(image).astype(np.float32)  # the types ImageJ reads
        atomic_write(path, lambda temporary: tifffile.imwrite(temporary, image, **options))
    elif path.suffix.lower() == ".png":  # fast zlib level: 8x quicker than the default, files ~1.5x larger
        atomic_write(path, lambda temporary: iio.imwrite(temporary, image, compress_level=1))
    else:
        atomic_write(path, lambda temporary: iio.imwrite(temporary, image))


def iter_slices(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The slices of ``read_slices(path)``, one at a time: a TIFF stack is read page by page.

    Memory holds one slice, whatever the stack's length. Raises DataError
    naming the file, like ``read_slices``.
    """
    path = Path(path)
    count = count_slices(path)
    if count == 1:
        yield from read_slices(path)
        return
    try:
        tiff = tifffile.TiffFile(path)
        series, has_channels = _tiff_series(tiff, path)
    except Exception as error:  # tifffile raises many types for bad files
        reason = error_reason(error)
        raise DataError(f"{path}: not a readable image ({reason})") from None
    with tiff:
        planes = None
        if series.axes.startswith("S"):  # samples as planes: one page holds every slice
            try:
                planes = np.asarray(series.asarray())
            except Exception as error:
                raise DataError(f"{path}: not a readable image ({error_reason(error)})") from None
        non_finite = 0
        for index in range(count):
            try:
                page = planes[index] if planes is not None else np.asarray(series.asarray(key=index))
            except Exception as error:
                reason = error_reason(error)
                raise DataError(f"{path}: slice {index} is not readable ({reason})") from None
            page = _to_grayscale(page, path) if has_channels and page.ndim == 3 else page
            non_finite += count_non_finite(page, path, index)
            yield page
        warn_non_finite(path, non_finite)


def normalize(image: np.ndarray, normalization: dict | None = None, fill: bool = True) -> np.ndarray:
    """Map an image of any dtype to float32 in [0, 1].

    ``{"mode": "percentile", "low": 1, "high": 99.8}`` (the default) stretches
    the image's own low..high percentiles to 0..1, which makes slices of
    different brightness and bit depth look alike to the network.
    ``{"mode": "range"}`` divides integer images by their dtype's maximum
    (255, 65535) and leaves float images as they are. Both clip to [0, 1].
    Non-finite pixels (NaN, inf) are left out of the statistics and filled with
    the median of the others (a neutral gray), or kept as NaN with ``fill=False``.
    """
    normalization = normalization or DEFAULT_NORMALIZATION
    mode = normalization.get("mode")
    image = np.asarray(image)
    invalid = ~np.isfinite(image) if image.dtype.kind == "f" else None
    if invalid is not None and not invalid.any():
        invalid = None
    if invalid is not None and invalid.all():
        raise DataError("no finite pixel to normalise (all NaN or infinite)")
    if mode == "percentile":
        values = image.astype(np.float32)
        sample = values if invalid is None else values[~invalid]
        low, high = np.percentile(sample, [normalization.get("low", 1.0), normalization.get("high", 99.8)])
        scale = float(high - low) if high > low else 1.0
        values -= np.float32(low)  # in place: no second full-size copy of a large slice
        values /= np.float32(scale)
    elif mode == "range":
        if image.dtype.kind in "ui":
            values = image.astype(np.float32) / np.iinfo(image.dtype).max
        else:
            values = image.astype(np.float32)
    else:
        raise DataError(f"unknown normalisation mode {mode!r} (expected 'percentile' or 'range')")
    values = np.clip(values, 0.0, 1.0, out=values)
    if invalid is not None:
        values[invalid] = np.median(values[~invalid]) if fill else np.nan
    return values


def binarize_label(label: np.ndarray) -> np.ndarray:
    """Foreground where the label is > 0 (labels may be 0/1 or 0/255), as uint8 0/1."""
    return (np.asarray(label) > 0).astype(np.uint8)


def check_label_values(label: np.ndarray, path) -> None:
    """0 is background and any value above 0 mitochondria: 0/1, 0/255 and instance ids alike.

    Refuses, naming the file, only what cannot be a mask: negative, fractional or non-finite
    values, and non-binary JPEG labels (lossy compression smears the edges into new values).
    Instance ids are binarised, which is said once.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"{path}: label has NaN or infinite values; a mask holds 0 for background and "
                            "whole numbers above 0 for mitochondria")
        fractional = label[label != np.round(label)]
        if fractional.size:
            raise DataError(f"{path}: label values such as {float(fractional[0]):g} are not whole numbers, so this "
                            "is not a mask (0 for background, whole numbers above 0 for mitochondria)")
    if label.dtype.kind in "if" and (label < 0).any():
        raise DataError(f"{path}: label has negative values such as {label.min():g}; a mask holds 0 for background "
                        "and values above 0 for mitochondria")
    values = np.unique(label)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return
    if _is_jpeg(path):
        shown = ", ".join(str(value) for value in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(f"{path}: label values {{{shown}}} are not a binary mask, and JPEG's lossy compression "
                        "smears masks: save labels as PNG or TIFF")
    note_once(f"{path}: label values 0 to {values.max():g} read as instance ids: every value above 0 is "
               "mitochondria (and so in any other such label)", "instances")


def _is_jpeg(path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False


# --- dataset layout -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


def find_pairs(root: str | os.PathLike, split: str) -> list[Pair]:
    """Image/label pairs of one split, matched by file stem and sorted.

    Raises DataError when a folder is missing or empty or a file has no partner.
    """
    split_dir = Path(root) / split
    folders = {kind: split_dir / kind for kind in ("images", "labels")}
    if not Path(root).is_dir():
        raise DataError(f"{root}: dataset folder not found")
    for folder in folders.values():
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (expected <root>/{split}/images and <root>/{split}/labels)")
    files = {kind: {path.stem: path for path in list_images(folder)} for kind, folder in folders.items()}
    if not files["images"]:
        raise DataError(f"{folders['images']}: no PNG, TIFF or JPEG images found")
    for kind, other in (("images", "labels"), ("labels", "images")):
        unpaired = sorted(set(files[kind]) - set(files[other]))
        if unpaired:
            example = files[kind][unpaired[0]]
            more = f" (and {len(unpaired) - 1} more)" if len(unpaired) > 1 else ""
            raise DataError(f"{example}: no matching file in {folders[other]}{more}")
    return [Pair(files["images"][stem], files["labels"][stem]) for stem in sorted(files["images"])]


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: the raw image (y, x) in its file's dtype and the mask (y, x) uint8 0/1."""
    image = read_image(pair.image)
    label = read_image(pair.label)
    if image.shape != label.shape:
        raise DataError(f"{pair.label}: label size {label.shape} differs from image size {image.shape} ({pair.image.name})")
    check_label_values(label, pair.label)
    mask = binarize_label(label)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        mask[~np.isfinite(image)] = 0  # no image there: no mitochondria to learn or score
    return image, mask


def load_split(root: str | os.PathLike, split: str) -> tuple[list[Pair], list[np.ndarray], list[np.ndarray]]:
    """All pairs of a split, read and checked before any work starts: (pairs, raw images, masks)."""
    pairs = find_pairs(root, split)
    loaded = [load_pair(pair) for pair in pairs]
    return pairs, [image for image, _ in loaded], [mask for _, mask in loaded]


# --- resampling to the model's pixel size -------------------------------------------

def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """A normalised (y, x) image resampled by ``scale`` (0.5 halves each side), float32.

    Downscaling smooths first (anti-aliasing), so that a half-size slice looks like
    the same tissue imaged at twice the pixel size.
    """
    if scale == 1:
        return np.asarray(image, np.float32)
    from skimage.transform import rescale

    return rescale(np.asarray(image, np.float32), scale, order=1, anti_aliasing=scale < 1,
                   preserve_range=True).astype(np.float32)


def rescale_raw(image: np.ndarray, scale: float) -> np.ndarray:
    """A raw (y, x) slice resampled like ``rescale_image``, in its own dtype (integers rounded and clipped), so
    that normalisation treats it as the original."""
    image = np.asarray(image)
    resampled = rescale_image(image, scale)
    if np.issubdtype(image.dtype, np.integer):
        limits = np.iinfo(image.dtype)
        return np.clip(np.rint(resampled), limits.min, limits.max).astype(image.dtype)
    return resampled.astype(image.dtype)


def rescale_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """A (y, x) 0/1 mask resampled like ``rescale_image``: a pixel is foreground where most of it was."""
    if scale == 1:
        return np.asarray(mask, np.uint8)
    return (rescale_image(mask, scale) >= 0.5).astype(np.uint8)


def resize_probability(probability: np.ndarray, shape: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """A (y, x) probability map brought back to the slice's ``shape`` by bilinear interpolation."""
    from skimage.transform import resize

    resized = resize(probability, shape, order=1, anti_aliasing=False, preserve_range=True)
    if out is None:
        return resized.astype(np.float32)
    out[...] = resized
    return out
