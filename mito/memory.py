"""Keep freed memory in the process, so TensorFlow's large feature maps are not faulted in again at every layer.

glibc hands every block above its mmap threshold (at most 32 MB) straight back to the operating system when
freed. A U-Net on a large tile allocates and frees maps of hundreds of MB at every layer, so each layer's
output is written into fresh pages that the kernel must first zero and map, a tenth of prediction's time or
more (benchmarks/RESULTS.md). Serving large blocks from the heap and not trimming it reuses those pages; the
peak memory stays about what it was, but it is not returned until the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
HEAP_SLACK = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of returning them; False (and nothing changed) elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, HEAP_SLACK)))
