"""The malloc thresholds: with them, a freed block is reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

# a fresh interpreter (no earlier allocation has moved glibc's thresholds) allocates, writes
# and frees a 24 MiB block twice and prints the page faults of the second time
PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from gensr_ray.allocator import keep_freed_memory
    assert keep_freed_memory()
size = 24 << 20
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


def _second_pass_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_rather_than_faulted_in_again():
    pages = (24 << 20) // 4096
    # glibc's defaults: the first block was mapped and unmapped, the second comes from a heap
    # grown for it, its pages fresh
    assert _second_pass_faults("default") > pages // 2
    assert _second_pass_faults("keep") < pages // 50
