"""How the process gives memory back, so that its footprint follows the steps.

NOTE [Giving memory back]
glibc serves blocks above M_MMAP_THRESHOLD with mmap and returns them at free; smaller ones
come from heaps it trims only above M_TRIM_THRESHOLD. Its defaults adapt: each freed mmap
block raises the threshold to that block's size (up to 32 MiB), so after a few steps every
activation tensor of a small model lives in the heap, and the resident set stays at the
largest step ever seen, plus up to 8 x cores arenas of 64 MiB for the threads that allocated.
Three modes (``memory.malloc`` in the daemon, SURGEON_MALLOC for the benchmarks):

- ``trim`` (default): glibc's fast adaptive thresholds, two arenas, and the heaps' free pages
  handed back (malloc_trim) before every step. Between steps the resident set is what the
  process holds; during a step it rises by every page the step touches, which with heap
  reuse is more than the tensors alive at once.
- ``return``: fixed thresholds, so every block over 256 KiB is its own mapping, returned at
  free: the resident set follows the tensors alive at each moment, at the price of a page
  fault per first touch of every fresh block (measured: steps about 2x slower on a 2-core x86).
- ``default``: glibc untouched.

A preloaded tcmalloc or jemalloc (LD_PRELOAD) replaces all three: glibc's settings are then
skipped, and since such an allocator keeps what it frees for reuse, the resident set says
nothing of one step's peak, so none is claimed on the CPU (CUDA's is unaffected). Measured
with ``surgeon-bench footprint`` (BENCHMARKS.md): tcmalloc's size classes keep the process
near the tensors alive at once without returning pages, the footprint of ``return`` at less
than the step time of ``trim``.

Operators' MALLOC_* environment variables win over the settings here. CUDA's caching
allocator is configured through PYTORCH_CUDA_ALLOC_CONF before CUDA starts
(``cuda_alloc_conf``, applied by the daemon only when the variable is unset).
"""

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Dict, Optional

__all__ = ["tune_malloc", "before_step", "returns_memory", "trim", "cuda_alloc_conf", "MODES",
           "allocator_name", "preloaded_allocator"]

log = logging.getLogger("surgeon.allocator")

MODES = ("trim", "return", "default")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8   # malloc.h
_RETURN = {"mmap_threshold": (M_MMAP_THRESHOLD, 256 * 1024, "MALLOC_MMAP_THRESHOLD_"),
           "trim_threshold": (M_TRIM_THRESHOLD, 1024 * 1024, "MALLOC_TRIM_THRESHOLD_")}
_ARENAS = {"arena_max": (M_ARENA_MAX, 2, "MALLOC_ARENA_MAX")}   # serving and learning
_state = {"mode": "default"}
_LIBC = []


def tune_malloc(mode: Optional[str] = None) -> Optional[Dict[str, int]]:
    """Apply ``mode`` (default: $SURGEON_MALLOC, else 'trim'); the mallopt settings applied,
    or None where the C library is not glibc."""
    mode = mode or os.environ.get("SURGEON_MALLOC") or "trim"
    if mode not in MODES:
        raise ValueError("malloc mode %r: choose %s" % (mode, ", ".join(MODES)))
    libc = _glibc()
    _state["mode"] = mode if libc is not None and not preloaded_allocator() else "default"
    if _state["mode"] == "default":
        return None if libc is None else {}
    wanted = dict(_ARENAS, **(_RETURN if mode == "return" else {}))
    applied = {}
    for name, (param, value, variable) in wanted.items():
        if variable not in os.environ and libc.mallopt(param, value) == 1:
            applied[name] = value
    log.debug("malloc mode %s: %s", mode, applied)
    return applied


@functools.lru_cache(maxsize=1)
def preloaded_allocator() -> Optional[str]:
    """``tcmalloc`` or ``jemalloc`` when one serves malloc in this process (LD_PRELOAD), else
    None. Such an allocator keeps what it frees for reuse: glibc's settings do not apply, and
    no step peak can be read off the resident set (NOTE [Step peak]). Read once: what was
    preloaded cannot change while the process runs, and status asks for it on every call."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc"):
        if "/lib%s" % name in text:
            return name
    return None


def allocator_name() -> str:
    """What serves the process's malloc, for reports: a preloaded allocator, or glibc's mode."""
    return preloaded_allocator() or "glibc, %s" % _state["mode"]


def returns_memory() -> bool:
    """Whether free memory goes back before each step, so a resident peak means something."""
    return _state["mode"] in ("trim", "return")


def before_step() -> None:
    """Called before each adaptation step: in 'trim' mode the heaps' free pages go back."""
    if _state["mode"] == "trim":
        trim()


def trim() -> bool:
    """Give the heaps' free pages back to the system now (malloc_trim); False where that
    does not exist."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _glibc():
    if not _LIBC:
        _LIBC.append(_load_glibc())
    return _LIBC[0]


def _load_glibc():
    if not hasattr(os, "confstr"):
        return None
    try:
        if "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (OSError, ValueError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def cuda_alloc_conf() -> str:
    """PYTORCH_CUDA_ALLOC_CONF for the daemon: release cached blocks above 80 % of the
    device's memory and never split blocks over 64 MiB (fragmentation on an 8 GB box)."""
    return "garbage_collection_threshold:0.8,max_split_size_mb:64"
