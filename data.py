"""Dataset layout and pairing, image and TIFF-stack I/O, normalisation, label binarisation, resampling.

Layout of a dataset root::

    <root>/{train,valid,test}/images/NNNN.png   EM slices (PNG, TIFF or JPEG, 8/16-bit)
    <root>/{train,valid,test}/labels/NNNN.png   masks, 0/1 or 0/255 (anything > 0 is foreground)

Images and labels are paired by file stem, so ``images/0001.tif`` pairs with
``labels/0001.png``.

Arrays: a 2D image is ``(y, x)``; a batch is ``(n, y, x, 1)`` float32 in [0, 1];
masks are ``(y, x)`` uint8 in {0, 1}.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from mito.errors import DataError, error_reason  # noqa: E402
from mito.files import atomic_write, partial_path  # noqa: E402

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


def read_slices(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image or a TIFF stack as ``(slices, y, x)`` in the file's own dtype.

    A 2D image gives one slice; a multi-page TIFF (or an ImageJ Z/T stack)
    gives one slice per page. RGB(A) becomes grayscale with a one-time warning.
    Raises DataError naming the file when it cannot be read or has other axes.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                image, has_channels = series.asarray(), series.axes.endswith("S")
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
    return image


def count_slices(path: str | os.PathLike) -> int:
    """How many slices ``read_slices`` would return, from the file header only."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return 1
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
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
        series = tiff.series[0]
    except Exception as error:  # tifffile raises many types for bad files
        reason = error_reason(error)
        raise DataError(f"{path}: not a readable image ({reason})") from None
    with tiff:
        has_channels = series.axes.endswith("S")
        for index in range(count):
            try:
                page = np.asarray(series.asarray(key=index))
            except Exception as error:
                reason = error_reason(error)
                raise DataError(f"{path}: slice {index} is not readable ({reason})") from None
            yield _to_grayscale(page, path) if has_channels and page.ndim == 3 else page


def _imagej_dtype(dtype) -> np.dtype:
    """The dtype a stack is written in: uint8, uint16 and float32 as they are, others as float32 (what ImageJ reads)."""
    return np.dtype(dtype) if np.dtype(dtype) in (np.uint8, np.uint16, np.float32) else np.dtype(np.float32)


class StackWriter:
    """Write an image, or a multi-page TIFF stack one slice at a time, atomically.

    ``add(page)`` ``count`` times, then ``close()`` renames the finished file
    into place; ``discard()`` (or an exception) leaves no file. A 2D output
    (``count == 1`` and not ``stack``) is written by ``write_image`` at close.
    A stack is streamed to disk by a background thread as an ImageJ TIFF
    (``ZYX``, or ``ZYXS`` for RGB pages), holding at most two pages in memory.
    """

    def __init__(self, path: str | os.PathLike, count: int, stack: bool = True):
        import queue

        self.path, self.count, self.stack = Path(path), count, stack
        self.pages: queue.Queue = queue.Queue(maxsize=1)
        self.thread, self.error, self.added, self.single = None, None, 0, None
        self.temporary = partial_path(self.path)

    def add(self, page: np.ndarray) -> None:
        page = np.asarray(page)
        self.added += 1
        if self.added > self.count:
            raise ValueError(f"{self.path}: more than {self.count} slices")
        if not self.stack:
            self.single = page
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._write, args=(page.shape, page.dtype), daemon=True)
            self.thread.start()
        while True:  # never block forever on a writer that failed
            if self.error is not None:
                raise self.error
            try:
                self.pages.put(page, timeout=0.1)
                return
            except Exception:  # queue.Full
                continue

    def _write(self, shape, dtype) -> None:
        def pages():
            for _ in range(self.count):
                page = self.pages.get()
                if page is None:
                    raise InterruptedError("stack writing discarded")
                if not np.can_cast(page.dtype, _imagej_dtype(dtype)) or page.shape != shape:
                    raise DataError(f"{self.path}: a slice of {page.dtype} {page.shape} does not fit the stack's "
                                    f"{_imagej_dtype(dtype)} {shape} set by its first slice")
                yield page.astype(_imagej_dtype(dtype), copy=False)

        try:
            rgb = len(shape) == 3
            tifffile.imwrite(self.temporary, pages(), shape=(self.count, *shape), dtype=_imagej_dtype(dtype),
                             imagej=True, photometric="rgb" if rgb else "minisblack",
                             metadata={"axes": "ZYXS" if rgb else "ZYX"})
        except BaseException as error:  # reported to the caller of add/close
            self.error = error

    def close(self) -> None:
        """Finish the file and rename it into place (raises what the writer raised)."""
        if not self.stack:
            write_image(self.path, self.single)
            return
        if self.added != self.count:
            self.discard()
            raise ValueError(f"{self.path}: {self.added} slices written, {self.count} expected")
        self.thread.join()
        if self.error is not None:
            self.temporary.unlink(missing_ok=True)
            raise self.error
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            try:
                self.pages.put(None, timeout=1)
            except Exception:  # queue.Full: the writer is stuck or gone
                pass
            self.thread.join(timeout=10)
        self.temporary.unlink(missing_ok=True)


# --- normalisation ------------------------------------------------------------


def normalize(image: np.ndarray, normalization: dict | None = None) -> np.ndarray:
    """Map an image of any dtype to float32 in [0, 1].

    ``{"mode": "percentile", "low": 1, "high": 99.8}`` (the default) stretches
    the image's own low..high percentiles to 0..1, which makes slices of
    different brightness and bit depth look alike to the network.
    ``{"mode": "range"}`` divides integer images by their dtype's maximum
    (255, 65535) and leaves float images as they are. Both clip to [0, 1].
    """
    normalization = normalization or DEFAULT_NORMALIZATION
    mode = normalization.get("mode")
    image = np.asarray(image)
    if mode == "percentile":
        values = image.astype(np.float32)
        low, high = np.percentile(values, [normalization.get("low", 1.0), normalization.get("high", 99.8)])
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
    return np.clip(values, 0.0, 1.0, out=values)


def binarize_label(label: np.ndarray) -> np.ndarray:
    """Foreground where the label is > 0 (labels may be 0/1 or 0/255), as uint8 0/1."""
    return (np.asarray(label) > 0).astype(np.uint8)


def check_label_values(label: np.ndarray, path) -> None:
    """Refuse labels that are not binary masks (0/1 or 0/255), naming the file.

    Instance labels (0, 1, 2, ...) or a lossy JPEG mask would otherwise be
    binarised silently into something the user did not mean.
    """
    values = np.unique(label)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return
    shown = ", ".join(str(value) for value in values[:6]) + (", ..." if len(values) > 6 else "")
    raise DataError(
        f"{path}: label values {{{shown}}} are not a binary mask (expected 0/1 or 0/255; "
        "for instance labels save label > 0)"
    )


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
    return image, binarize_label(label)


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


# --- fast paired augmentation: tf.data, vectorised over the batch ---------------


# --- the built-in synthetic demo --------------------------------------------------


