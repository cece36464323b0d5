"""glibc malloc settings for a process that runs torch on the CPU for a long time.

glibc gives large freed blocks back to the kernel (each block over its mmap threshold is
unmapped, and a heap's free top beyond the trim threshold is released), and the next
allocation of that size faults in fresh zeroed pages. Both thresholds move with the
allocation history, so whether a process does this depends on what it allocated first. A
scoring worker allocates the same activations every forward: measured on the CPU scorer
(`perf stat`), the workers of a 2-worker pass page-faulted 34-40k times a second each, the
worker of the 1-worker pass before them 16 times a second, and the same in-process scoring
loop spent 1-7 % of its time in the kernel from one run to the next.

Fixed thresholds end the drift: blocks up to 32 MiB (glibc's largest threshold on 64-bit)
come from the heap and are reused, and up to 1 GiB of free heap is kept. The cost is that a
process holds on to its peak working set instead of returning it between forwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

log = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """Set fixed malloc thresholds for this process (see the module's docstring): True when
    glibc took them, False on a C library without `mallopt` (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    # only glibc's mallopt takes these parameters
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    taken = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and taken
    if not taken:
        log.warning("glibc refused the malloc thresholds; freed memory may be unmapped")
    return taken
