"""Giving freed memory back to the operating system between the steps of a long task.

glibc's malloc raises its mmap threshold to the largest block freed, so after the first chunk a
chunk's stacks (megabytes each) come from the heap, and the heap is returned to the system only
from its top: a task that reads chunk after chunk grows by fragments it no longer uses (measured:
8 MiB a chunk of 250 tiny adapters). malloc_trim(0) returns every free page; elsewhere (macOS,
musl) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    trim = _trim()
    if trim is not None:
        trim(0)
