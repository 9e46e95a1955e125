"""Process memory allocator: keep freed memory for reuse instead of returning it to the kernel.

PyTorch's CPU tensors come from the C allocator. glibc ``malloc`` serves every block of at least its mmap
threshold (128 KiB at start, adapted upwards to at most 32 MiB) with a fresh ``mmap`` and gives it back with
``munmap`` on free, and trims the top of the heap whenever more than 128 KiB are free there. A training
step allocates and frees the same large activations every step, so with the defaults each of them is
page-faulted in again (the kernel zeroes every 4 KiB page) on every use: on our measurements a third to a
half of an MoE layer's forward+backward time, and more when another library's allocations run between
ours (docs/benchmarks.md, "Memory allocator"). This is the problem PyTorch's caching allocator solves on
GPUs.

:func:`tune_malloc` (called once when ``moesaic`` is imported) sets, via ``mallopt`` (glibc only):

* ``M_MMAP_MAX = 0``: no block is served by ``mmap``; all come from the heap (arenas) and are reused;
* ``M_TRIM_THRESHOLD = 1 GiB`` and ``M_TOP_PAD = 64 MiB``: free memory at the top of the heap is kept
  (up to 1 GiB) instead of being returned after every step.

The cost is resident memory: freed blocks stay mapped (up to the trim threshold at the top of the heap),
like a caching allocator's pool. Set ``MOESAIC_MALLOC=default`` before importing moesaic to leave the C
allocator as it is (it is also left alone when another allocator such as jemalloc or tcmalloc is preloaded,
or when the ``MALLOC_*_`` environment variables of glibc are set: the user chose).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
ENV = "MOESAIC_MALLOC"
_GLIBC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
              "GLIBC_TUNABLES")

_state: dict[str, str] = {}


def preloaded_allocator() -> str | None:
    """``jemalloc`` or ``tcmalloc`` when such an allocator is loaded into this process, else None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in maps:
            return name
    return None


def tune_malloc(force: bool = False) -> str:
    """Apply the settings of the module docstring once (``force``: even if applied already); returns
    :func:`allocator_description`. No-op off glibc, with ``MOESAIC_MALLOC=default``, with a preloaded
    allocator, or when glibc's own ``MALLOC_*_`` variables are set."""
    if _state and not force:
        return allocator_description()
    choice = os.environ.get(ENV, "tuned").strip().lower()
    other = preloaded_allocator()
    if other:
        _state["desc"] = f"{other} (preloaded)"
    elif choice in ("default", "off", "0", "no", "false"):
        _state["desc"] = f"glibc malloc defaults ({ENV}={choice})"
    elif any(v in os.environ for v in _GLIBC_ENV):
        _state["desc"] = "glibc malloc (MALLOC_* environment settings)"
    elif not sys.platform.startswith("linux"):
        _state["desc"] = "system malloc"
    else:
        _state["desc"] = _mallopt()
    return _state["desc"]


def _mallopt() -> str:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system malloc (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(M_MMAP_MAX, 0) == 1) & (mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1) \
        & (mallopt(M_TOP_PAD, TOP_PAD) == 1)
    if not ok:
        return "glibc malloc (mallopt refused)"
    return f"glibc malloc, moesaic-tuned (no mmap, trim {TRIM_THRESHOLD >> 20} MiB, top pad {TOP_PAD >> 20} MiB)"


def allocator_description() -> str:
    """One line naming the C allocator settings this process runs with (printed by the benchmarks)."""
    if not _state:
        other = preloaded_allocator()
        return f"{other} (preloaded)" if other else "glibc malloc defaults (moesaic not tuned)"
    return _state["desc"]


__all__ = ["ENV", "allocator_description", "preloaded_allocator", "tune_malloc"]
