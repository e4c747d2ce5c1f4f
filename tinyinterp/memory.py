"""Keep freed memory for reuse: glibc malloc settings that JAX on the CPU needs to be fast.

Every call of a jitted function gets fresh output buffers from ``malloc``. With glibc's defaults
a buffer of a few MB (a cached [batch, head, pos, pos] pattern is 4 MB at batch 64, 4 heads,
64 positions) is either ``mmap``-ed and unmapped again on every call, or carved from the top of
the heap and trimmed back to the OS when freed. Either way the next call touches new pages, and
the page faults cost more than the computation: caching all 30 hook points of the 2-layer
reference model took 3.1x a plain forward with the defaults and 1.7x with these settings
(``benchmarks/forward.py``, same machine).

``keep_freed_memory()`` sets ``M_MMAP_THRESHOLD`` (allocations below it come from the heap and
are reused) and ``M_TRIM_THRESHOLD`` (freed memory at the top of the heap is kept up to this
size). The cost: memory a process has used stays reserved for it until it exits, as with JAX's
own GPU allocator. Nothing is changed at import: the ``tinyinterp`` command and the benchmarks
call ``tune_malloc()`` once at start (on Linux with glibc only, unless the environment variable
``TINYINTERP_MALLOC=default`` is set; glibc's own ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` variables, if set, are left to win). A library user who wants the same
speed calls ``tinyinterp.memory.tune_malloc()`` once, early in the program.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply the malloc settings described in the module docstring. True when glibc took them;
    False elsewhere (other platforms or C libraries), where nothing is changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) & bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold))


def tune_malloc() -> bool:
    """``keep_freed_memory()`` unless TINYINTERP_MALLOC=default or glibc's own variables are set.
    Runs once per process (later calls return the first answer); returns whether the settings
    are on. The command line and the benchmarks call it; ``import tinyinterp`` does not."""
    global _applied
    if _applied is None:
        skip = (os.environ.get("TINYINTERP_MALLOC", "").lower() == "default"
                or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ)
        _applied = False if skip else keep_freed_memory()
    return _applied
