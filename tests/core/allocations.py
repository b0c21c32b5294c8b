"""The most bytes a call held at once, from the profiler's allocation events (CPU tensors)."""

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Largest sum of CPU allocations made during ``fn()`` and alive at one moment (what it
    returns included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    memory = [e for e in events if e.name() == "[memory]"]
    # torch 2.0's events carry microseconds only; a stable sort keeps ties in recorded order
    memory.sort(key=lambda e: e.start_ns() if hasattr(e, "start_ns") else e.start_us() * 1000)
    live = peak = 0
    for nbytes in (e.nbytes() for e in memory):
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
