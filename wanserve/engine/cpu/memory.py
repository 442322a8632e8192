"""Keep the memory a CPU rank frees inside the process, so the next request reuses it.

Written for glibc's malloc (2.36) through `mallopt`; on any other C library this does nothing.
Used only when the model runs on CPU (on CUDA the activations live in torch's caching
allocator and never reach malloc).

By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
`mmap` and unmaps it on free, and returns the top of the heap to the kernel once more than the
trim threshold is free there. A request allocates and frees the same large activations over
and over, so each of them is faulted in page by page again, and on the 2-core VM of
BENCHMARKS.md a first touch costs ~3 us per 4 KiB page against ~0.05 us for a page already
mapped.

`keep_freed_memory()` turns both off: large blocks come from the heap like small ones, and the
heap never shrinks. The price is memory: resident memory stays at the high-water mark instead
of falling back between requests (~20 % more between requests on the tiny model; both figures
from benchmarks/cpu_memory.py, BENCHMARKS.md). `cpu.keep_freed_memory: false` turns it
off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("wanserve.engine")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the heap must have 2 GiB free at its top


def keep_freed_memory() -> bool:
    """Ask malloc never to unmap or trim freed memory; True when glibc accepted both."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    accepted = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    if not accepted:
        log.warning("malloc did not accept the settings that keep freed memory in the process")
    return accepted
