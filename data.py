"""Dataset layout, image I/O, normalisation, paired augmentation and tiling.

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
import math
import os
import re
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_NORMALIZATION = {"mode": "percentile", "low": 1.0, "high": 99.8}
# A model may see slices resampled (its settings' "scale"): 0.5 halves each side, 4 is the most enlargement.
MAX_SCALE = 4.0


class MitoError(Exception):
    """A problem the user can fix; the scripts print it on one line and exit with 2."""


class DataError(MitoError):
    """A dataset, image or output path that cannot be used; the message names the file."""


def error_reason(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --- files --------------------------------------------------------------------


# This machine's name in temporary file names: letters, digits and '_' only, so names parse back.
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, beside it, named after this process
    and machine (``remove_stale_partials`` reads both back), with the final suffix."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{_HOST}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create ``path`` through ``write(temporary_path)``, then rename it into place.

    The temporary file sits in the same folder (so the rename is atomic) and
    keeps the final suffix, which Keras and the image writers need. Readers
    never see a half-written file, and an interrupted write leaves the old file.
    """
    path = Path(path)
    temporary = partial_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def remove_stale_partials(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete temporary files that a killed writer left behind; returns how many.

    They are hidden (``.<stem>.partial-<pid>-<host><suffix>``) and never trusted;
    those of a process that is still running are left alone, and so are those
    of other machines (shards of one job may share an output folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.partial-*") if recursive else folder.glob(".*.partial-*"):
        pid, _, host = path.name.rsplit(".partial-", 1)[1].split(".")[0].partition("-")
        if host not in ("", _HOST) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def overlay(image: np.ndarray, outlines, tint: np.ndarray | None = None) -> np.ndarray:
    """An RGB picture of an EM slice with mask outlines drawn on it.

    image: (y, x) float in [0, 1]; outlines: [(mask, (r, g, b)), ...], each
    mask (y, x) with nonzero foreground; tint: a mask shaded green underneath.
    Returns (y, x, 3) uint8.
    """
    from skimage.segmentation import find_boundaries

    gray = np.clip(image, 0, 1) * 255
    picture = np.repeat(gray[..., None], 3, axis=-1)
    if tint is not None:
        picture[tint > 0] = 0.65 * picture[tint > 0] + 0.35 * np.array([0, 255, 0])
    for mask, colour in outlines:
        picture[find_boundaries(mask > 0, mode="inner")] = colour
    return picture.astype(np.uint8)


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


def prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead, in order.

    For overlapping reading and normalising with computing: the order and the
    values are those of a plain ``for`` loop, and an exception raised by the
    iteration is raised here, at the point where the loop would have raised it.
    """
    import queue

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            outcome = (done, None)
        except BaseException as error:  # handed to the consumer
            outcome = (done, error)
        while not stop.is_set():
            try:
                buffer.put(outcome, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


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


def load_pair(pair: Pair, normalization: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: the normalised image (y, x) float32 and the mask (y, x) uint8 0/1."""
    image = read_image(pair.image)
    label = read_image(pair.label)
    if image.shape != label.shape:
        raise DataError(f"{pair.label}: label size {label.shape} differs from image size {image.shape} ({pair.image.name})")
    check_label_values(label, pair.label)
    return normalize(image, normalization), binarize_label(label)


def load_split(
    root: str | os.PathLike, split: str, normalization: dict | None = None
) -> tuple[list[Pair], list[np.ndarray], list[np.ndarray]]:
    """All pairs of a split, read and checked before any work starts."""
    pairs = find_pairs(root, split)
    loaded = [load_pair(pair, normalization) for pair in pairs]
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


# --- paired augmentation --------------------------------------------------------

# Geometry for ImageDataGenerator (the same draw is applied to image and mask).
GEOMETRIC_AUGMENTATION = dict(
    rotation_range=90,
    width_shift_range=0.05,
    height_shift_range=0.05,
    shear_range=10.0,
    zoom_range=0.15,
    horizontal_flip=True,
    vertical_flip=True,
    fill_mode="reflect",
)
# Intensity changes, applied to the image only.
INTENSITY_AUGMENTATION = dict(brightness=0.1, contrast=0.2, gamma=1.3, noise=0.03)
# Stronger intensity changes (and blur) for slices whose brightness, contrast or focus vary.
STRONG_INTENSITY_AUGMENTATION = dict(brightness=0.15, contrast=0.35, gamma=1.6, noise=0.05, blur=1.5)
INTENSITY_AUGMENTATIONS = {"standard": INTENSITY_AUGMENTATION, "strong": STRONG_INTENSITY_AUGMENTATION}
# Only the 8 symmetries of the square (flips, transposes: with them all 90-degree rotations).
# They permute pixels exactly, so tiles keep the slices' texture, which interpolated rotations,
# shears and zooms smooth (a model trained on those meets sharper slices at test time).
DIHEDRAL_AUGMENTATION = dict(horizontal_flip=True, vertical_flip=True, transpose=True, fill_mode="reflect")
GEOMETRIES = {"affine": GEOMETRIC_AUGMENTATION, "dihedral": DIHEDRAL_AUGMENTATION}

# get_random_transform seeds NumPy's global generator; serialise those calls so
# that threaded data loading stays deterministic.
_transform_lock = threading.Lock()


def _image_data_generator(geometry: dict):
    import tensorflow as tf  # only the augmenting code needs TensorFlow

    # ImageDataGenerator has no transpose; augment_pair applies it.
    return tf.keras.preprocessing.image.ImageDataGenerator(**{k: v for k, v in geometry.items() if k != "transpose"})


def augmentation_context(tile_size: int, geometry: dict | None) -> int:
    """Pixels of context around a tile that a transform drawn from ``geometry`` may pull in.

    Enough that a rotated, sheared, zoomed-out or shifted tile stays inside its crop; none
    when the geometry only flips and transposes (or there is none).
    """
    moving = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range")
    return int(math.ceil(tile_size * 0.35)) if geometry and any(geometry.get(key) for key in moving) else 0


def augment_pair(generator, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, intensity: dict | None,
                 transpose: bool = False):
    """One random geometric transform applied to both arrays, intensity to the image only.

    image: (y, x) float32 in [0, 1]; mask: (y, x) uint8 0/1. Returns the same
    shapes and dtypes; the mask is re-binarised after interpolation. ``transpose``:
    half the time both arrays are also transposed (with the generator's flips, every
    90-degree rotation); square arrays only.
    """
    with _transform_lock:
        params = generator.get_random_transform(image.shape + (1,), seed=int(rng.integers(2**31)))
    image = generator.apply_transform(image[..., None], params)[..., 0]
    mask = generator.apply_transform(mask[..., None].astype(np.float32), params)[..., 0]
    if transpose and rng.random() < 0.5:
        image, mask = image.T, mask.T
    if intensity:
        image = jitter_intensity(image, rng, **intensity)
    return image.astype(np.float32), (mask > 0.5).astype(np.uint8)


def jitter_intensity(image, rng, brightness=0.0, contrast=0.0, gamma=1.0, noise=0.0, blur=0.0):
    """Random blur (half the time), gamma, contrast, brightness and Gaussian noise; clipped to [0, 1]."""
    if blur and rng.random() < 0.5:
        from scipy import ndimage

        image = ndimage.gaussian_filter(image, rng.uniform(0.3, blur))
    image = np.clip(image, 0.0, 1.0) ** np.exp(rng.uniform(-np.log(gamma), np.log(gamma)))
    mean = image.mean()
    image = (image - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean + rng.uniform(-brightness, brightness)
    if noise:
        image = image + rng.normal(0.0, rng.uniform(0, noise), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _reflect_to_at_least(array: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, max(0, size - length)) for length in array.shape]
    return np.pad(array, pad, mode="reflect") if any(after for _, after in pad) else array


def random_tile(images, masks, tile_size: int, rng: np.random.Generator, context: int = 0):
    """A random (tile + 2*context)-sized crop from a random image, picked by area."""
    areas = np.array([image.size for image in images], dtype=np.float64)
    index = rng.choice(len(images), p=areas / areas.sum())
    size = tile_size + 2 * context
    image = _reflect_to_at_least(images[index], size)
    mask = _reflect_to_at_least(masks[index], size)
    y = rng.integers(0, image.shape[0] - size + 1)
    x = rng.integers(0, image.shape[1] - size + 1)
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


# --- fast paired augmentation: tf.data, vectorised over the batch ---------------


def _affine_transforms(tf, keys, batch: int, crop: int, out: int, geometry: dict):
    """Per-sample random affine transforms drawn from ``geometry`` (ImageDataGenerator's ranges).

    The same distribution as ``ImageDataGenerator.get_random_transform`` followed by
    ``apply_transform``: rotation, shift (a fraction of the crop), shear, zoom per axis,
    then flips, and (``transpose``, as ``augment_pair``) half the time a transpose of the
    output. keys: 6 random keys. Returns (batch, 8) float32 rows for
    ``ImageProjectiveTransformV3``, mapping an output pixel of an ``out``-sized tile to its
    source in the ``crop``-sized crop, both centred. Raises ValueError for settings this
    path does not implement.
    """
    known = {"rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
             "horizontal_flip", "vertical_flip", "transpose", "fill_mode"}
    if set(geometry) - known or geometry.get("fill_mode", "reflect") != "reflect":
        raise ValueError(f"the fast augmentation implements {sorted(known)} with fill_mode 'reflect', got {geometry}")
    zoom = geometry.get("zoom_range", 0.0)
    zoom = (1 - zoom, 1 + zoom) if np.isscalar(zoom) else tuple(zoom)

    def uniform(key, low, high, count=1):
        return tf.random.stateless_uniform((batch, count), key, low, high)

    theta = uniform(keys[0], -1.0, 1.0) * np.deg2rad(geometry.get("rotation_range", 0.0))
    shift = uniform(keys[1], -1.0, 1.0, 2) * crop * [geometry.get("width_shift_range", 0.0),
                                                     geometry.get("height_shift_range", 0.0)]
    shear = uniform(keys[2], -1.0, 1.0) * np.deg2rad(geometry.get("shear_range", 0.0))
    zooms = uniform(keys[3], zoom[0], zoom[1], 2)
    flips = uniform(keys[4], 0.0, 1.0, 2) < 0.5
    allowed = [geometry.get("horizontal_flip", False), geometry.get("vertical_flip", False)]
    flips = tf.where(flips & allowed, -1.0, 1.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # M = rotation @ shear @ zoom @ flip, in (x, y) = (column, row) coordinates; (batch, 1) entries.
    zx, zy = zooms[:, :1] * flips[:, :1], zooms[:, 1:] * flips[:, 1:]
    s00, s01, s11 = zx, -tf.sin(shear) * zy, tf.cos(shear) * zy
    m00, m01 = cos * s00, cos * s01 - sin * s11
    m10, m11 = sin * s00, sin * s01 + cos * s11
    if geometry.get("transpose"):  # M @ [[0, 1], [1, 0]]: swap the columns
        swap = uniform(keys[5], 0.0, 1.0) < 0.5
        m00, m01 = tf.where(swap, m01, m00), tf.where(swap, m00, m01)
        m10, m11 = tf.where(swap, m11, m10), tf.where(swap, m10, m11)
    c_in, c_out = (crop - 1) / 2, (out - 1) / 2
    t_x = cos * shift[:, :1] - sin * shift[:, 1:] + c_in - (m00 + m01) * c_out
    t_y = sin * shift[:, :1] + cos * shift[:, 1:] + c_in - (m10 + m11) * c_out
    zeros = tf.zeros_like(m00)
    return tf.concat([m00, m01, t_x, m10, m11, t_y, zeros, zeros], axis=1)


def _sample_pairs(tf, tables, width: int, origins, corners, limits, transforms, out: int):
    """Bilinear samples of ``out``-sized tiles around crop boxes of the stacked images.

    tables: flat (images * height * width,) arrays, the images and the masks (any number type);
    origins: (batch,) flat index of each sample's image; corners: (batch, 2) row and column
    of its crop box in that image; limits: (batch, 2) that image's height and width;
    transforms: (batch, 8) rows mapping an output pixel (x, y) to crop-box coordinates
    (``ImageProjectiveTransformV3``'s convention, affine part only). Beyond the box the
    image's own pixels are used, beyond the image its edge pixels. Returns one
    (batch, out, out, 1) array per table, all sampled at the same points. Gathers and
    arithmetic only, so XLA fuses it (separate tables, because XLA slows down badly on
    channel slices of a gathered array).
    """
    grid = tf.range(out, dtype=tf.float32)
    m = [transforms[:, k, None, None] for k in range(6)]
    corners, limits = tf.cast(corners, tf.float32), limits[:, :, None, None] - 2
    x = m[0] * grid[None, None, :] + m[1] * grid[None, :, None] + m[2] + corners[:, 1, None, None]
    y = m[3] * grid[None, None, :] + m[4] * grid[None, :, None] + m[5] + corners[:, 0, None, None]
    # The left/upper neighbour, kept inside the image; weights from the clipped neighbour, so the
    # last row and column are read exactly and points beyond the image take its edge pixels.
    x0 = tf.clip_by_value(tf.floor(x), 0.0, tf.cast(limits[:, 1], tf.float32))
    y0 = tf.clip_by_value(tf.floor(y), 0.0, tf.cast(limits[:, 0], tf.float32))
    wx, wy = tf.clip_by_value(x - x0, 0.0, 1.0), tf.clip_by_value(y - y0, 0.0, 1.0)
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    top = origins[:, None, None] + y0 * width + x0
    samples = []
    for table in tables:
        def at(offset, table=table):
            return tf.cast(tf.gather(table, top + offset), tf.float32)

        upper = at(0) * (1 - wx) + at(1) * wx
        lower = at(width) * (1 - wx) + at(width + 1) * wx
        samples.append((upper * (1 - wy) + lower * wy)[..., None])
    return samples


def _blur_batch(tf, images, keys, blur: float, radius: int):
    """Blur half the samples with a Gaussian of sigma uniform in [0.3, blur]; valid part only.

    images: (batch, y, x, 1) -> (batch, y - 2 * radius, x - 2 * radius, 1). Each sample has
    its own separable kernel, applied as a sum of shifted copies (which XLA fuses).
    """
    batch = images.shape[0]
    sigma = tf.random.stateless_uniform((batch, 1), keys[0], 0.3, blur)
    blurred = tf.random.stateless_uniform((batch, 1), keys[1]) < 0.5
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)[None]
    kernel = tf.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = tf.where(blurred, kernel / tf.reduce_sum(kernel, axis=1, keepdims=True),
                      tf.cast(offsets == 0, tf.float32))  # (batch, taps); identity when not blurred
    taps = [kernel[:, tap, None, None, None] for tap in range(2 * radius + 1)]
    rows, cols = images.shape[1] - 2 * radius, images.shape[2] - 2 * radius
    images = sum(weight * images[:, tap : tap + rows] for tap, weight in enumerate(taps))
    return sum(weight * images[:, :, tap : tap + cols] for tap, weight in enumerate(taps))


def _noise_batch(tf, bank, keys, shape):
    """Standard normal noise of ``shape`` (batch, y, x, 1), cut from ``bank`` (tiles, y, x).

    Each sample takes a random tile of the bank, shifted cyclically by a random offset and
    with a random sign: Gaussian noise for every pixel, at the cost of a gather instead of
    fresh random numbers (which cost a third of a batch on a CPU).
    """
    batch, rows, cols = shape[0], shape[1], shape[2]
    draws = tf.random.stateless_uniform((batch, 4), keys[0])
    tile = tf.cast(draws[:, 0] * bank.shape[0], tf.int32)[:, None, None]
    dy = tf.cast(draws[:, 1] * rows, tf.int32)[:, None, None]
    dx = tf.cast(draws[:, 2] * cols, tf.int32)[:, None, None]
    sign = tf.where(draws[:, 3] < 0.5, -1.0, 1.0)[:, None, None, None]
    y = tf.math.floormod(tf.range(rows)[None, :, None] + dy, rows)
    x = tf.math.floormod(tf.range(cols)[None, None, :] + dx, cols)
    return tf.gather(tf.reshape(bank, [-1]), (tile * rows + y) * cols + x)[..., None] * sign


def _jitter_batch(tf, images, keys, noise_field=None, brightness=0.0, contrast=0.0, gamma=1.0, noise=0.0):
    """``jitter_intensity`` without blur, vectorised: (batch, y, x, 1) float32 -> same, in [0, 1].

    noise_field: standard normal noise of the images' shape, needed when ``noise`` is set.
    """
    batch = images.shape[0]

    def uniform(key, low, high):
        return tf.random.stateless_uniform((batch, 1, 1, 1), key, low, high)

    exponent = tf.exp(uniform(keys[0], -np.log(gamma), np.log(gamma)))
    images = tf.exp(tf.math.log(tf.clip_by_value(images, 1e-6, 1.0)) * exponent)  # images ** exponent
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * uniform(keys[1], 1 - contrast, 1 + contrast) + mean
    images += uniform(keys[2], -brightness, brightness)
    if noise:
        images += noise_field * uniform(keys[3], 0.0, noise)
    return tf.clip_by_value(images, 0.0, 1.0)


class FastTrainingTiles:
    """``TrainingTiles`` in TensorFlow ops: the same tiles and augmentation, many times faster.

    The training images sit in memory as one tensor; each batch is cut, transformed and
    jittered by vectorised ops: random crops with context (picked by image area, as
    ``random_tile``), one random affine transform per sample (``geometry``, the
    ``ImageDataGenerator`` ranges) applied to the image and mask stacked as two channels of
    one array, so they cannot desynchronise (bilinear, reflecting at the crop border, mask
    re-binarised at 0.5), then ``intensity`` on the image only: blur of half the samples
    (when ``blur`` is set), gamma, contrast, brightness, noise.

    Batch ``(epoch, index)`` comes from stateless random ops keyed by (seed, epoch, index),
    so a resumed run sees the batches the interrupted one would have seen. The draws differ
    from ``TrainingTiles``' (another generator), the distribution is the same.

    A batch is ``(x, y)``: x ``(batch, tile, tile, 1)`` float32 in [0, 1], y the matching
    masks as float32 0/1.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        tile_size: int,
        batch_size: int,
        steps_per_epoch: int,
        augment: bool = True,
        seed: int = 0,
        geometry: dict | None = None,
        intensity: dict | None = None,
    ):
        import tensorflow as tf

        self.tile_size, self.batch_size, self.steps_per_epoch = tile_size, batch_size, steps_per_epoch
        self.augment, self.seed = augment, seed
        self.geometry = dict(GEOMETRIC_AUGMENTATION if geometry is None else geometry) if augment else {}
        self.intensity = dict(INTENSITY_AUGMENTATION if intensity is None else intensity) if augment else {}
        self.context = augmentation_context(tile_size, self.geometry)
        blur = self.intensity.get("blur", 0.0)
        self.blur_radius = int(4 * blur + 0.5) if blur else 0  # scipy's gaussian_filter truncates at 4 sigma
        if augment:
            _affine_transforms(tf, [(0, 0)] * 6, 1, 1, 1, self.geometry)  # unsupported settings fail now
        crop = tile_size + 2 * self.context
        images = [_reflect_to_at_least(image, crop) for image in images]
        masks = [_reflect_to_at_least(mask, crop) for mask in masks]
        self.shapes = np.array([image.shape for image in images], np.int32)
        self.height, self.width = (int(length) for length in self.shapes.max(axis=0))
        if len(images) * self.height * self.width >= 2**31:
            raise DataError(f"{len(images)} training images of up to {self.height} x {self.width} pixels are too many "
                            "for --augment fast (2**31 pixels at most); use --augment keras")
        self.tables = []  # the images (float32), then the masks (uint8), each flat: (images * height * width,)
        for arrays, dtype in ((images, np.float32), (masks, np.uint8)):
            stack = np.zeros((len(arrays), self.height, self.width), dtype)
            for number, array in enumerate(arrays):
                stack[number, : array.shape[0], : array.shape[1]] = array
            self.tables.append(tf.constant(stack.reshape(-1)))
        area = np.cumsum(self.shapes.prod(axis=1).astype(np.float64))
        self.cumulative_area = tf.constant((area / area[-1])[None, :-1], tf.float32)  # (1, images - 1)
        # XLA fuses the per-pixel arithmetic into a few loops: several times faster than op by op.
        self._jitted = tf.function(self._make_batch_xla, jit_compile=True)
        self._batch = tf.function(self._make_batch)
        self.noise_bank = None
        if self.intensity.get("noise"):  # 16 tiles of Gaussian noise, cut per sample by _noise_batch
            self.noise_bank = tf.random.stateless_normal((16, tile_size, tile_size), (seed, 2**31 - 1))

    def _make_batch(self, epoch, index):
        """Batch (epoch, index) as two tensors."""
        import tensorflow as tf

        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(self.seed, tf.int64), epoch]), index)
        return self._jitted(tf.random.experimental.stateless_split(key, 16))

    def _make_batch_xla(self, keys):
        import tensorflow as tf

        keys = tf.unstack(keys)
        batch, tile = self.batch_size, self.tile_size
        crop = tile + 2 * self.context
        # A crop box per sample: an image picked by area, then a position inside it.
        pick = tf.random.stateless_uniform((batch, 1), keys[0])
        chosen = tf.reduce_sum(tf.cast(pick >= self.cumulative_area, tf.int32), axis=1)
        limits = tf.gather(self.shapes, chosen)
        room = tf.cast(limits - crop + 1, tf.float32)  # (batch, 2)
        corner = tf.cast(tf.random.stateless_uniform((batch, 2), keys[1]) * room, tf.int32)
        origins = chosen * self.height * self.width
        if self.augment:
            out = tile + 2 * self.blur_radius
            transforms = _affine_transforms(tf, keys[2:7] + keys[15:16], batch, crop, out, self.geometry)
            image, mask = _sample_pairs(tf, self.tables, self.width, origins, corner, limits, transforms, out)
            if self.blur_radius:
                image = _blur_batch(tf, image, keys[7:9], self.intensity["blur"], self.blur_radius)
                r = self.blur_radius
                mask = mask[:, r:-r, r:-r]
            jitter = {name: value for name, value in self.intensity.items() if name != "blur"}
            noise = None
            if self.noise_bank is not None:
                noise = _noise_batch(tf, self.noise_bank, keys[14:15], (batch, tile, tile))
            image = _jitter_batch(tf, image, keys[9:14], noise, **jitter) if jitter else image
            mask = tf.cast(mask > 0.5, tf.float32)
        else:
            grid = tf.range(tile)
            top_left = origins + corner[:, 0] * self.width + corner[:, 1]
            image, mask = (tf.cast(tf.gather(table, top_left[:, None, None] + grid[:, None] * self.width + grid),
                                   tf.float32)[..., None] for table in self.tables)
        shape = (batch, tile, tile, 1)
        return tf.ensure_shape(image, shape), tf.ensure_shape(mask, shape)

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch`` as NumPy arrays (the one ``dataset`` yields there)."""
        import tensorflow as tf

        x, y = self._batch(tf.constant(epoch, tf.int64), tf.constant(index, tf.int64))
        return x.numpy(), y.numpy()

    def dataset(self, first_epoch: int, epochs: int, workers: int = 1, input_context=None):
        """A tf.data.Dataset of the batches of epochs first_epoch .. epochs - 1, in order.

        ``workers`` batches are prepared in parallel (each one also uses TensorFlow's
        own threads); the order stays fixed. Use like ``TrainingTiles.dataset``; one
        machine only: with an ``input_context`` (several workers) it raises DataError.
        """
        import tensorflow as tf

        if input_context is not None and input_context.num_input_pipelines > 1:
            raise DataError("--augment fast does not split batches among several machines yet; "
                            "use --augment keras there")

        steps = self.steps_per_epoch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        steps_range = tf.data.Dataset.range(first_epoch * steps, epochs * steps)
        return (steps_range.map(lambda step: self._batch(step // steps, step % steps),
                                num_parallel_calls=max(1, workers), deterministic=True)
                .prefetch(2).with_options(options))


class TrainingTiles:
    """Random augmented training tiles, fed to ``model.fit`` as a ``tf.data`` pipeline.

    Batch ``(epoch, index)`` is drawn from its own generator seeded by
    (seed, epoch, index): a pure function of its position in training, so
    runs repeat exactly whatever the number of loading threads, and a resumed
    run sees the very batches the interrupted one would have. Each sample is a
    crop with extra context around the tile; the geometric transform is
    applied to the crop and the centre is kept, so rotations rarely need
    filling.

    A batch is ``(x, y)``: x ``(batch, tile, tile, 1)`` float32 in [0, 1], y the
    matching masks as float32 0/1.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        tile_size: int,
        batch_size: int,
        steps_per_epoch: int,
        augment: bool = True,
        seed: int = 0,
        geometry: dict | None = None,
        intensity: dict | None = None,
    ):
        self.images, self.masks = list(images), list(masks)
        self.tile_size, self.batch_size, self.steps_per_epoch = tile_size, batch_size, steps_per_epoch
        self.augment, self.seed = augment, seed
        geometry = (GEOMETRIC_AUGMENTATION if geometry is None else geometry) if augment else None
        self.generator = _image_data_generator(geometry) if augment else None
        self.transpose = bool(augment and geometry.get("transpose"))
        self.intensity = INTENSITY_AUGMENTATION if intensity is None else intensity
        self.context = augmentation_context(tile_size, geometry)

    def batch(self, epoch: int, index: int, share: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch``; with ``share=(k, n)``, the k-th of n equal parts of it.

        Each part is drawn from its own generator, seeded by (seed, epoch, index, k): replicas
        on different workers get different tiles without exchanging anything.
        """
        rng = np.random.default_rng([self.seed, epoch, index] + ([share[0]] if share else []))
        size = self.batch_size // share[1] if share else self.batch_size
        x = np.empty((size, self.tile_size, self.tile_size, 1), np.float32)
        y = np.empty_like(x)
        for sample in range(size):
            image, mask = random_tile(self.images, self.masks, self.tile_size, rng, self.context)
            if self.augment:
                image, mask = augment_pair(self.generator, image, mask, rng, self.intensity, self.transpose)
                centre = slice(self.context, self.context + self.tile_size)
                image, mask = image[centre, centre], mask[centre, centre]
            x[sample, ..., 0], y[sample, ..., 0] = image, mask
        return x, y

    def dataset(self, first_epoch: int, epochs: int, workers: int = 1, input_context=None):
        """A tf.data.Dataset of the batches of epochs first_epoch .. epochs - 1, in order.

        ``workers`` threads prepare batches in parallel; the order stays fixed.
        Use with ``fit(..., steps_per_epoch=self.steps_per_epoch, initial_epoch=first_epoch)``.

        On one machine the batches are global batches, which the strategy splits among its
        replicas. With a ``tf.distribute.InputContext`` (``distribute_datasets_from_function``,
        several workers), this worker's pipeline yields only its replicas' parts of each global
        batch, one per-replica batch per element: no two replicas see the same tiles in a step.
        """
        import tensorflow as tf

        steps = self.steps_per_epoch
        replicas = input_context.num_replicas_in_sync if input_context else 1
        if self.batch_size % replicas:
            raise DataError(f"global batch {self.batch_size} does not split evenly among {replicas} replicas")
        local = replicas // input_context.num_input_pipelines if input_context else 1
        first_replica = input_context.input_pipeline_id * local if input_context else 0
        shape = (self.batch_size // replicas, self.tile_size, self.tile_size, 1)

        def make(element):
            step, replica = divmod(int(element), local)
            share = (first_replica + replica, replicas) if input_context else None
            return self.batch(step // steps, step % steps, share)

        def load(element):
            x, y = tf.numpy_function(make, [element], (tf.float32, tf.float32), stateful=False)
            return tf.ensure_shape(x, shape), tf.ensure_shape(y, shape)

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        elements = tf.data.Dataset.range(first_epoch * steps * local, epochs * steps * local)
        return (elements.map(load, num_parallel_calls=max(1, workers), deterministic=True)
                .prefetch(2).with_options(options))


def grid_tiles(images, masks, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every image into non-overlapping tiles (reflect-padded at the edges).

    Deterministic validation data: returns x ``(n, tile, tile, 1)`` float32 and
    y of the same shape (0/1 float32), covering every pixel exactly once.
    """
    xs, ys = [], []
    for image, mask in zip(images, masks):
        rows, cols = (math.ceil(length / tile_size) for length in image.shape)
        pad = [(0, rows * tile_size - image.shape[0]), (0, cols * tile_size - image.shape[1])]
        image, mask = np.pad(image, pad, mode="reflect"), np.pad(mask, pad, mode="reflect")
        for row in range(rows):
            for col in range(cols):
                window = np.s_[row * tile_size : (row + 1) * tile_size, col * tile_size : (col + 1) * tile_size]
                xs.append(image[window])
                ys.append(mask[window])
    return np.stack(xs)[..., None].astype(np.float32), np.stack(ys)[..., None].astype(np.float32)


# --- tiled prediction -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: ``read`` in the padded image, ``keep`` inside the tile's output,
    ``write`` in the output image. All are (y-slice, x-slice)."""

    read: tuple[slice, slice]
    keep: tuple[slice, slice]
    write: tuple[slice, slice]


@dataclasses.dataclass(frozen=True)
class TileLayout:
    pad: tuple[tuple[int, int], tuple[int, int]]  # reflect padding of the image, (before, after) per axis
    tile_shape: tuple[int, int]  # every tile has this shape
    tiles: tuple[Tile, ...]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _axis_layout(length: int, tile_size: int, margin: int, align: int):
    """Cut one axis into ``n`` equal aligned tiles overlapping by at least ``2 * margin``.

    Returns (tile side, [(read start, write start, write stop)], padding after the axis).
    The axis is padded only at its end, to a multiple of ``align``; the first and
    last tiles start and stop at the image's edges, where the network's own
    padding applies as in a whole-image prediction, so margins are spent only
    between tiles. Each tile keeps the part of its overlaps nearer its centre.
    """
    padded = _round_up(length, align)
    if padded <= tile_size:
        return padded, [(0, 0, length)], padded - length
    count = math.ceil((padded - 2 * margin) / (tile_size - 2 * margin))
    side = _round_up(math.ceil((padded + (count - 1) * 2 * margin) / count), align)
    # Spread the starts evenly on the alignment grid: consecutive starts differ by at most side - 2 * margin.
    starts = [(index * (padded - side) // (count - 1)) // align * align for index in range(count)]
    cuts = [0] + [min(length, (start + following + side) // 2) for start, following in zip(starts, starts[1:])]
    spans = [(start, cut, stop) for start, cut, stop in zip(starts, cuts, cuts[1:] + [length])]
    return side, spans, padded - length


def tile_layout(shape: tuple[int, int], tile_size: int, overlap: int, align: int = 1) -> TileLayout:
    """The geometry of a tiled prediction, computed once for cropping and merging.

    Tiles of equal shape, at most ``tile_size``, overlap by at least
    ``overlap`` (rounded up to ``align``); each output pixel is kept from the
    one tile where it lies at least ``overlap // 2`` from every border that
    is not the image's own. At the image's edges nothing is added (only a
    reflect padding to the next multiple of ``align`` at the end of each
    axis), so a slice that fits in one tile is one bare prediction. Tile
    origins and sizes are multiples of ``align`` (``2**depth`` for a U-Net),
    so every tile sees the pooling grid of the whole image: with an overlap of
    at least twice the network's receptive-field reach the result equals
    whole-image prediction (``predict_whole``).
    """
    if tile_size < 1 or overlap < 0 or align < 1:
        raise DataError(f"invalid tiling: tile_size={tile_size}, overlap={overlap}, align={align}")
    margin = _round_up(math.ceil(overlap / 2), align)
    tile_size = tile_size // align * align
    if tile_size - 2 * margin < align:
        raise DataError(
            f"tile size {tile_size} is too small for overlap {2 * margin}: "
            f"use a tile size of at least {2 * margin + align}"
        )
    (tile_y, spans_y, pad_y), (tile_x, spans_x, pad_x) = (
        _axis_layout(length, tile_size, margin, align) for length in shape
    )
    tiles = []
    for read_y, y0, y1 in spans_y:
        for read_x, x0, x1 in spans_x:
            tiles.append(
                Tile(
                    read=(slice(read_y, read_y + tile_y), slice(read_x, read_x + tile_x)),
                    keep=(slice(y0 - read_y, y1 - read_y), slice(x0 - read_x, x1 - read_x)),
                    write=(slice(y0, y1), slice(x0, x1)),
                )
            )
    return TileLayout(pad=((0, pad_y), (0, pad_x)), tile_shape=(tile_y, tile_x), tiles=tuple(tiles))


def _reflect_indices(start: int, stop: int, length: int) -> np.ndarray | slice:
    """Indices into an axis of ``length`` for positions ``start..stop`` of its reflect-padded version.

    Position 0 is the axis' first pixel; negative positions and positions past
    the end mirror about the edge pixels (``np.pad(mode="reflect")``, repeated
    when the padding is wider than the axis). A plain slice when nothing mirrors.
    """
    if 0 <= start and stop <= length:
        return slice(start, stop)
    if length == 1:
        return np.zeros(stop - start, np.intp)
    period = 2 * (length - 1)
    phase = np.arange(start, stop) % period
    return np.where(phase < length, phase, period - phase)


def read_tile(image: np.ndarray, read: tuple[slice, slice], pad: tuple[int, int]) -> np.ndarray:
    """The window ``read`` of ``image`` reflect-padded by ``pad`` (before y, before x), without padding the image.

    Equals ``np.pad(image, ..., mode="reflect")[read]`` but copies only the window.
    """
    rows = _reflect_indices(read[0].start - pad[0], read[0].stop - pad[0], image.shape[0])
    cols = _reflect_indices(read[1].start - pad[1], read[1].stop - pad[1], image.shape[1])
    if isinstance(rows, slice) and isinstance(cols, slice):
        return image[rows, cols]
    rows, cols = (np.arange(s.start, s.stop) if isinstance(s, slice) else s for s in (rows, cols))
    return image[np.ix_(rows, cols)]


def predict_tiled(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile_size: int = 1024,
    overlap: int = 0,
    align: int = 1,
    batch_size: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Apply ``predict_fn`` to an image of any size in overlapping tiles and stitch.

    image: (y, x), float32 in [0, 1] (other dtypes are converted tile by tile).
    predict_fn maps a batch (n, ty, tx, 1) float32 to (n, ty, tx, 1) or
    (n, ty, tx). Returns (y, x) float32, written into ``out`` when given.
    Each output pixel comes from exactly one tile, taken at least
    ``overlap // 2`` pixels away from that tile's borders inside the image,
    so there are no seams (see ``tile_layout``). Memory beyond the image and the output is one
    batch of tiles: the image is never padded or copied as a whole.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"predict_tiled expects a 2D image, got shape {image.shape}")
    layout = tile_layout(image.shape, tile_size, overlap, align)
    if out is None:
        out = np.empty(image.shape, np.float32)
    before = (layout.pad[0][0], layout.pad[1][0])
    tiles = list(layout.tiles)
    batch = np.empty((min(batch_size, len(tiles)), *layout.tile_shape, 1), np.float32)
    for start in range(0, len(tiles), batch_size):
        batch_tiles = tiles[start : start + batch_size]
        for slot, tile in enumerate(batch_tiles):
            batch[slot, ..., 0] = read_tile(image, tile.read, before)
        result = np.asarray(predict_fn(batch[: len(batch_tiles)]))
        if result.ndim == 4:
            result = result[..., 0]
        if result.shape != (len(batch_tiles), *layout.tile_shape):
            raise ValueError(f"predict_fn returned shape {result.shape} for a batch of shape "
                             f"{(len(batch_tiles), *layout.tile_shape, 1)}")
        for tile, tile_result in zip(batch_tiles, result):
            out[tile.write] = tile_result[tile.keep]
    return out


def predict_whole(predict_fn, image: np.ndarray, align: int = 1) -> np.ndarray:
    """Predict an image in one piece: one bare call, padded (reflect) only at its end to a multiple of ``align``."""
    pad = [(0, _round_up(length, align) - length) for length in image.shape]
    padded = np.pad(np.asarray(image, np.float32), pad, mode="reflect")
    result = np.asarray(predict_fn(padded[None, ..., None]), np.float32).reshape(padded.shape)
    return result[: image.shape[0], : image.shape[1]]


def with_tta(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: average ``predict_fn`` over the 8 flips and 90-degree rotations.

    Each of the 8 transforms of a batch (n, y, x, 1) is predicted and mapped
    back by the inverse transform before averaging, so the result has the
    input's shape and orientation. Costs 8 predictions; for predict_tiled,
    tiles must be square or have both sides aligned (they are).
    """

    def predict(batch):
        batch = np.asarray(batch, np.float32)
        total = np.zeros(batch.shape, np.float32)
        for flip in (False, True):
            flipped = batch[:, :, ::-1] if flip else batch
            for quarter_turns in range(4):
                turned = np.rot90(flipped, quarter_turns, axes=(1, 2))
                result = np.asarray(predict_fn(np.ascontiguousarray(turned)), np.float32).reshape(turned.shape)
                result = np.rot90(result, -quarter_turns, axes=(1, 2))
                total += result[:, :, ::-1] if flip else result
        return total / 8

    return predict


def postprocess(mask: np.ndarray, options: dict | None) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels, then fill holes of at most ``max_hole`` pixels.

    mask: (y, x) with nonzero foreground. options: ``{"min_size": int,
    "max_hole": int}`` as tuned on the validation split and stored in the
    model's JSON; None or zeros leave the mask as it is. Returns bool (y, x).
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    mask = np.asarray(mask) > 0
    options = options or {}
    if options.get("min_size", 0) > 1:
        mask = remove_small_objects(mask, max_size=options["min_size"] - 1)
    if options.get("max_hole", 0) > 0:
        mask = remove_small_holes(mask, max_size=options["max_hole"])
    return mask


# --- the built-in synthetic demo --------------------------------------------------

DEMO_ROOT = Path("dataset/demo")
DEMO_SPLITS = {"train": 8, "valid": 2, "test": 2}
DEMO_SHAPE = (512, 512)
DEMO_UNLABELED_SHAPES = ((389, 611), (200, 150))


def _smooth_noise(rng, shape, sigma):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-8)


def synthetic_em_slice(rng: np.random.Generator, shape=DEMO_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like slice and its mitochondria mask: (y, x) uint8 image, uint8 0/1 mask.

    Cells with wavy dark membranes and granular cytoplasm; mitochondria are
    dark elongated ellipses with a darker double membrane and light cristae
    stripes across them. Distractors a model must learn to ignore: dark round
    vesicles without cristae and thick dark myelin-like rings.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.segmentation import find_boundaries

    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Cells: a Voronoi tessellation of warped coordinates gives wavy membranes.
    n_cells = max(2, int(height * width / 70**2))
    seeds = rng.uniform([0, 0], [height, width], size=(n_cells, 2))
    warp_y = 6 * _smooth_noise(rng, shape, 12)
    warp_x = 6 * _smooth_noise(rng, shape, 12)
    points = np.stack([(yy + warp_y).ravel(), (xx + warp_x).ravel()], axis=1)
    cells = cKDTree(seeds).query(points)[1].reshape(shape)
    membranes = find_boundaries(cells, mode="thick")

    image = 0.68 + 0.05 * _smooth_noise(rng, shape, 30)
    image += rng.normal(0, 0.05, n_cells)[cells]  # per-cell brightness
    image += 0.05 * _smooth_noise(rng, shape, 1.0)  # granular cytoplasm
    mask = np.zeros(shape, bool)
    inside = ndimage.distance_transform_edt(~membranes)
    roomy = np.argwhere(inside > 8)

    def window(cy, cx, radius):
        """Slices of a square around (cy, cx), clipped to the image."""
        radius = int(math.ceil(radius))
        return np.s_[max(0, int(cy) - radius) : int(cy) + radius + 1, max(0, int(cx) - radius) : int(cx) + radius + 1]

    for _ in range(int(n_cells * 1.6)):  # mitochondria, not touching each other
        a, b, angle = rng.uniform(12, 30), rng.uniform(5, 10), rng.uniform(0, np.pi)
        cy, cx = roomy[rng.integers(len(roomy))]
        if inside[cy, cx] <= b + 3:
            continue
        box = window(cy, cx, a + 3)
        y, x = yy[box] - cy, xx[box] - cx
        u = y * np.sin(angle) + x * np.cos(angle)  # along the major axis
        v = y * np.cos(angle) - x * np.sin(angle)
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        body = (r <= 1.0) & (cells[box] == cells[cy, cx]) & (inside[box] > 2)
        if body.sum() < 40 or (ndimage.binary_dilation(body, iterations=3) & mask[box]).any():
            continue
        cristae = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(5, 8) + rng.uniform(0, 2 * np.pi))
        shade = 0.32 + 0.14 * cristae + 0.03 * rng.standard_normal()
        image[box][body] = shade[body]
        image[box][body & (r > 0.8)] = 0.2  # the darker double membrane
        mask[box] |= body
    for _ in range(int(n_cells * 1.2)):  # dark round vesicles: not mitochondria
        radius = rng.uniform(3, 7)
        cy, cx = rng.uniform([0, 0], [height, width])
        box = window(cy, cx, radius)
        blob = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 <= radius**2
        image[box][blob & ~mask[box]] = 0.3
    for _ in range(max(1, n_cells // 8)):  # thick myelin-like rings: not mitochondria
        radius, thickness = rng.uniform(18, 35), rng.uniform(4, 7)
        cy, cx = rng.uniform([0, 0], [height, width])
        box = window(cy, cx, radius + thickness)
        distance = np.sqrt((yy[box] - cy) ** 2 + (xx[box] - cx) ** 2)
        ring = np.abs(distance - radius) <= thickness / 2
        image[box][ring & ~mask[box]] = 0.22
    image[membranes & ~mask] = 0.3
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 0.035, shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


def make_demo_dataset(root: str | os.PathLike = DEMO_ROOT, seed: int = 2015, shape=DEMO_SHAPE, splits=None) -> Path:
    """Write the deterministic synthetic demo dataset in our layout (labels 0/255).

    Also writes ``unlabeled/`` with odd-sized slices for the prediction demo.
    Files are written atomically; existing files are left alone.
    """
    from tqdm import tqdm

    root = Path(root)
    splits = splits or DEMO_SPLITS
    progress = tqdm(total=sum(splits.values()) + len(DEMO_UNLABELED_SHAPES), desc="demo data", unit="slice",
                    file=sys.stderr, leave=False)
    index = 0
    for split, count in splits.items():
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image_path = root / split / "images" / f"{index:04d}.png"
            label_path = root / split / "labels" / f"{index:04d}.png"
            if not (image_path.exists() and label_path.exists()):
                image, mask = synthetic_em_slice(np.random.default_rng([seed, index]), shape)
                write_image(label_path, mask * 255)
                write_image(image_path, image)
            index += 1
            progress.update()
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for unlabeled_shape in DEMO_UNLABELED_SHAPES:
        path = root / "unlabeled" / f"{index:04d}.png"
        if not path.exists():
            write_image(path, synthetic_em_slice(np.random.default_rng([seed, index]), unlabeled_shape)[0])
        index += 1
        progress.update()
    progress.close()
    return root


def demo_is_complete(root: str | os.PathLike = DEMO_ROOT) -> bool:
    root = Path(root)
    expected = sum(DEMO_SPLITS.values())
    found = sum(len(list_images(root / split / "images")) for split in DEMO_SPLITS if (root / split / "images").is_dir())
    return found == expected and (root / "unlabeled").is_dir()


def iter_batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
