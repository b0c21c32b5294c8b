"""How the process gives memory back, so that its footprint follows the steps.

NOTE [Giving memory back]
glibc serves blocks above M_MMAP_THRESHOLD with mmap and returns them at free; smaller ones
come from heaps it trims only above M_TRIM_THRESHOLD. Its defaults adapt: each freed mmap
block raises the threshold to that block's size (up to 32 MiB), so after a few steps every
activation tensor of a small model lives in the heap, and the resident set stays at the
largest step ever seen, plus up to 8 x cores arenas of 64 MiB for the threads that allocated.
Three modes (``memory.malloc`` in the daemon, SURGEON_MALLOC for the benchmarks):

- ``trim`` (default): glibc's fast adaptive thresholds, two arenas, and the heaps' free pages
  handed back (malloc_trim) before and after every step. Between steps the resident set is
  what the process holds; during a step it rises by every page the step touches, which with heap
  reuse is more than the tensors alive at once.
- ``return``: fixed thresholds, so every block over 256 KiB is its own mapping, returned at
  free: the resident set follows the tensors alive at each moment, at the price of a page
  fault per first touch of every fresh block (measured: steps about 2x slower on a 2-core x86).
- ``default``: glibc untouched.

NOTE [Preloaded allocator]
glibc's best fit spreads a step's big blocks over every hole its heap has (measured: a daemon
step of 76 MiB alive at once laid its blocks over 449 MiB of distinct pages), and ``trim``
hands all of them back before the next step, so each step faults them in again: the footprint
of full backprop at a fraction of its memory. tcmalloc's spans are reused compactly: the
daemon and the benchmarks preload it where it is installed (``memory.allocator`` /
SURGEON_ALLOCATOR: ``auto``, the default, takes tcmalloc, else glibc) by executing themselves
again with LD_PRELOAD set, before anything else runs (``exec_with_allocator``). Under a
preloaded tcmalloc or jemalloc, ``trim`` and ``return`` both release its free pages before
and after every step (MallocExtension_ReleaseFreeMemory; jemalloc's purge of every arena): the
resident set then grows in a step by the pages that step touches, which is its peak as the
box sees it (NOTE [Step peak]); ``default`` leaves the allocator alone and claims no peak.
Measured with ``surgeon-bench footprint`` (BENCHMARKS.md).

Operators' MALLOC_* environment variables win over the settings here. CUDA's caching
allocator is configured through PYTORCH_CUDA_ALLOC_CONF before CUDA starts
(``cuda_alloc_conf``, applied by the daemon only when the variable is unset).
"""

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

__all__ = ["tune_malloc", "before_step", "after_step", "returns_memory", "trim",
           "cuda_alloc_conf", "MODES", "allocator_name", "preloaded_allocator", "ALLOCATORS",
           "PACKAGES", "preloadable", "allocator_library", "preload_command",
           "exec_with_allocator"]

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
    if preloaded_allocator():
        _state["mode"] = mode if _preloaded_release() is not None else "default"
        return {}
    _state["mode"] = mode if libc is not None else "default"
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
    """What serves the process's malloc and in which mode, for reports."""
    return "%s, %s" % (preloaded_allocator() or "glibc", _state["mode"])


def returns_memory() -> bool:
    """Whether free memory goes back before each step, so a resident peak means something."""
    return _state["mode"] in ("trim", "return")


def before_step() -> None:
    """Called before each adaptation step: free pages go back (NOTE [Giving memory back]), so
    the step's resident peak is its own."""
    _hand_back()


def after_step() -> None:
    """Called after each adaptation step: the pages it touched go back, so a learner that
    pauses (budget, no frames, a command) leaves the box what it does not hold."""
    _hand_back()


def _hand_back() -> None:
    if preloaded_allocator():
        if _state["mode"] != "default":   # set only where a release call exists
            _preloaded_release()()
    elif _state["mode"] == "trim":
        trim()


def trim() -> bool:
    """Give the heaps' free pages back to the system now (malloc_trim); False where that
    does not exist."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


@functools.lru_cache(maxsize=1)
def _preloaded_release():
    """A call that hands the preloaded allocator's free pages back, or None."""
    name, process = preloaded_allocator(), ctypes.CDLL(None)
    try:
        if name == "tcmalloc":
            release = process.MallocExtension_ReleaseFreeMemory
            release.restype = None
            return release
        if name == "jemalloc":
            mallctl = process.mallctl
            mallctl.argtypes = [ctypes.c_char_p] + [ctypes.c_void_p] * 3 + [ctypes.c_size_t]
            return lambda: mallctl(b"arena.4096.purge", None, None, None, 0)  # every arena
    except AttributeError:   # a build without the extension interface
        log.warning("%s is preloaded but offers no way to release memory", name)
    return None


ALLOCATORS = ("auto", "tcmalloc", "jemalloc", "glibc")
_LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
              "jemalloc": ("libjemalloc.so.2",)}
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}   # Debian/Ubuntu
_LIBRARY_DIRS = ("/usr/lib/aarch64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")
_PRELOAD_MARK = "SURGEON_ALLOCATOR_PRELOADED"   # set on the second run: never a third


def preloadable(choice: str) -> Optional[str]:
    """The allocator ``choice`` preloads (``auto``: tcmalloc), None for glibc."""
    if choice not in ALLOCATORS:
        raise ValueError("allocator %r: choose %s" % (choice, ", ".join(ALLOCATORS)))
    return None if choice == "glibc" else "tcmalloc" if choice == "auto" else choice


def allocator_library(choice: str, dirs: Optional[Tuple[str, ...]] = None) -> Optional[str]:
    """The path of the library ``choice`` preloads, or None where it is not installed or the
    choice is glibc."""
    for name in _LIBRARIES.get(preloadable(choice), ()):
        for folder in dirs or _LIBRARY_DIRS:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def preload_command(choice: Optional[str] = None) -> Optional[Tuple[List[str], Dict[str, str]]]:
    """(argv, environment) that run this command again with ``choice`` (default:
    $SURGEON_ALLOCATOR, else ``auto``) preloaded; None where nothing is to be done: glibc
    chosen, an allocator already preloaded, a second run, no library, or a command line that
    cannot be rebuilt (``python -c`` before Python 3.10)."""
    choice = choice or os.environ.get("SURGEON_ALLOCATOR") or "auto"
    if not preloadable(choice) or preloaded_allocator() or os.environ.get(_PRELOAD_MARK):
        return None
    path = allocator_library(choice)
    if path is None:
        if choice != "auto":
            log.warning("%s is not installed: glibc's malloc serves (NOTE [Giving memory "
                        "back])", choice)
        return None
    argv = _own_command()
    if argv is None:
        return None
    env = dict(os.environ, **{_PRELOAD_MARK: path})
    env["LD_PRELOAD"] = " ".join([path] + env.get("LD_PRELOAD", "").split())
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))   # no stderr notes
    return argv, env


def _own_command() -> Optional[List[str]]:
    """This process's command line, to execute again."""
    original = getattr(sys, "orig_argv", None)   # Python 3.10+: flags and -c code included
    if original:
        return [sys.executable] + list(original[1:])
    if sys.argv[0] in ("-c", ""):
        return None
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:   # python -m package: run the module again, not its file
        name = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", name] + sys.argv[1:]
    return [sys.executable] + sys.argv


def exec_with_allocator(choice: Optional[str] = None) -> None:
    """Execute this command again with the chosen allocator preloaded (NOTE [Preloaded
    allocator]); returns where that is not to be done. Call it first thing in a command's
    main, before threads, sockets or files are opened."""
    command = preload_command(choice)
    if command is None:
        return
    argv, env = command
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


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
