"""How this process's C library keeps or returns freed memory: glibc's mallopt, set one way for training and the
other for serving. Elsewhere (another C library) nothing changes."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def mallopt(settings: dict[int, int]) -> bool:
    """Set glibc malloc parameters for this process; False where the C library is not glibc (or refuses one)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in settings.items())
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Training: keep the memory a step frees for the next step.

    By default every block above 32 MB (a step's logits: 4,096 tokens x 8,192 in fp32 is 134 MB) is a fresh
    mmap whose pages fault in, zeroed, on first touch, step after step (the cost is measured in
    docs/training-on-cpu.md). Serving them from the heap and never trimming it removes those faults; the cost is
    that the process keeps its peak memory."""
    return mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1})


def return_large_buffers_to_the_system() -> bool:
    """Serving: glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), after which the
    logits of a long prefill or scoring window (16 MB at 512 x 8192) come from the heap and stay in the
    process when freed, so one long request grows the server for good. A fixed 1 MB threshold hands such
    buffers back (tests/test_memory.py); decode steps allocate far less than 1 MB, so they do not pay for it."""
    return mallopt({M_MMAP_THRESHOLD: 1 << 20})
