"""The memory a step really needs: its peak, not only the bytes autograd caches.

NOTE [Step peak]
A box runs out of memory at the step's peak (the dense forward, the packing temporaries, the
augmentation, backward's gradients), and what tegrastats and psutil report is the process's
resident set. ``PeakMeter`` measures both around one step:

- CUDA: ``max_memory_allocated`` above what was allocated at the start (the tensors the step
  added at its worst), and ``max_memory_reserved`` (what the caching allocator held).
- CPU (Linux): writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's resident
  high-water mark (VmHWM) to the current resident set; VmHWM read after the step, minus the
  resident set before it, is the step's peak as the kernel saw it. Memory the allocator kept
  from earlier steps and reuses would not show, so the heaps' free pages are handed back
  before each step (NOTE [Giving memory back]); what then shows depends on the allocator
  mode: every page the step touched ('trim', the default), or the tensors alive at the worst
  moment ('return'). The mark is per process: another thread allocating meanwhile (the
  daemon's serving) counts too, which is what the box sees.

Both marks are reset when a meter starts, so a meter opened inside another (the engine's
inside ``Method.step``) first hands the mark reached so far to the ones around it: the outer
step's peak is the larger of what came before the inner meter and what came after its reset.

Elsewhere (no procfs, clear_refs not writable, glibc left to keep what it frees) the peak is
None, never a guess.
"""

import time
from typing import Dict, List, Optional, Tuple

import torch

from .allocator import returns_memory

__all__ = ["PeakMeter", "resident_bytes", "resident_split"]

_OPEN: List["PeakMeter"] = []   # meters inside one another, outermost first (the learner's thread)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(*fields: str) -> List[Optional[int]]:
    """Each field's value in bytes (None where absent or unreadable), from one read."""
    found: Dict[str, int] = {}
    try:
        with open(_STATUS) as status:
            for line in status:
                name = line.split(":", 1)[0] + ":"
                if name in fields:
                    found[name] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        found = {}
    return [found.get(field) for field in fields]


def resident_bytes() -> Optional[int]:
    """The process's resident set (VmRSS) now."""
    return _status_kib("VmRSS:")[0]


def resident_split() -> Tuple[Optional[int], Optional[int]]:
    """The resident set (VmRSS) and its anonymous part (RssAnon), read together. The anonymous
    part is the process's own memory, without the file-backed pages of the libraries' code it
    has run (shared, and reclaimed by the kernel as page cache: MemAvailable counts them as
    available)."""
    rss, anonymous = _status_kib("VmRSS:", "RssAnon:")
    return rss, anonymous


def _reset_high_water() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter(device) as meter: step()``; then ``meter.peak_bytes`` (the step's peak
    above its start), ``meter.reserved_bytes`` (CUDA: the allocator's peak reservation) and
    ``meter.resident_bytes`` (CPU: the process's resident peak during the step)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self.reserved_bytes: Optional[int] = None
        self.resident_bytes: Optional[int] = None
        self._start: Optional[int] = None
        self.seconds = 0.0

    def __enter__(self) -> "PeakMeter":
        self._t0 = time.perf_counter()
        self._carried: Optional[Tuple[int, ...]] = None   # marks the meters inside reset
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._hand_marks_out()
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif returns_memory():
            self._hand_marks_out()
            if _reset_high_water():
                self._start = resident_bytes()
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._start is None:
            return
        marks = _higher(self._marks(), self._carried)
        if self.device.type == "cuda":
            self.peak_bytes = marks[0] - self._start
            self.reserved_bytes = marks[1]
        elif marks is not None:
            self.resident_bytes = marks[0]
            self.peak_bytes = max(0, marks[0] - self._start)
        self.seconds = time.perf_counter() - self._t0

    def _marks(self) -> Optional[Tuple[int, ...]]:
        """The high-water marks now: CUDA (allocated, reserved), CPU (VmHWM,)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device),
                    torch.cuda.max_memory_reserved(self.device))
        high = _status_kib("VmHWM:")[0]
        return None if high is None else (high,)

    def _hand_marks_out(self) -> None:
        """Before this meter resets the marks, the open meters on its device keep them."""
        outer = [m for m in _OPEN if m.device == self.device and m._start is not None]
        marks = self._marks() if outer else None
        if marks is None:
            return
        for meter in outer:
            meter._carried = _higher(marks, meter._carried)


def _higher(marks: Optional[Tuple[int, ...]],
            carried: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
    """``marks`` raised, mark by mark, to what was ``carried`` (None: nothing to raise or
    nothing read)."""
    if marks is None or carried is None:
        return marks
    return tuple(map(max, marks, carried))
