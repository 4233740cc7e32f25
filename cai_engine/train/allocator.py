"""The training process keeps the memory it frees, instead of handing it back to the OS between steps.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping and unmaps it
on free, so each step's large tensors (a 113 MB embedding gradient, a micro-batch's attention and MLP
activations, the gradient buffers) are page-faulted in again, 4 KiB at a time, on every step. One PPO
iteration of `bench/bench_rl.py` faulted 22 GB that way: 35.1 s an iteration against 31.3 s with mmap and
trimming off, at the same peak RSS (8,275 vs 8,330 MiB). `CAI_ENGINE_MALLOC=system` keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # mallopt parameters, from glibc's malloc.h
_applied: str | None = None


def retain_freed_memory() -> str:
    """Turn off glibc's mmap for large blocks and its heap trimming, once per process; returns one line for the
    log saying what was done (or why not: another C library, or `CAI_ENGINE_MALLOC=system`)."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get("CAI_ENGINE_MALLOC", "retain")
    if choice not in ("retain", "system"):
        raise ValueError(f"CAI_ENGINE_MALLOC = {choice!r}: expected retain or system")
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        glibc = None
    if choice == "system":
        _applied = "allocator: the C library's defaults (CAI_ENGINE_MALLOC=system)"
    elif not glibc:
        _applied = "allocator: the C library's defaults (not glibc)"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # 2**31 - 1: mallopt takes an int; a heap top larger than that free at once is still given back
        done = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _applied = (f"allocator: freed memory kept for reuse ({glibc}: no mmap blocks, no trimming)" if done
                    else f"allocator: the C library's defaults ({glibc} refused mallopt)")
    return _applied
