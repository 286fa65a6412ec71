"""Writing a TIFF stack slice by slice, atomically: memory holds one slice, readers never see half a stack."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import tifffile

from data import write_image
from mito.errors import DataError
from mito.files import partial_path


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
