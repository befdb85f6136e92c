"""Keep freed host memory in the process heap during CPU rollouts (glibc only; elsewhere nothing is done).

glibc serves blocks above a dynamic threshold (128 KiB, raised to the largest mmapped block freed so
far) with ``mmap`` and gives the top of the heap back to the OS once more than twice that is free. A chunk
forward allocates and frees activations of a few MiB each, so every forward found its memory returned and
touched it anew: ~9k page faults per forward at dim 512 (measured, ``bench/bench_rollout.py``), and the
ops that first touch that memory (GELU, copies) ran several times slower. Fixing the thresholds at
glibc's own ceiling for mmap (32 MiB) and a trim threshold of 256 MiB keeps that memory in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD_BYTES = 256 * 2**20

_done: bool | None = None


def keep_host_heap() -> bool:
    """Set the thresholds once per process; True when they are in force (glibc on Linux)."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
            )
    return _done
