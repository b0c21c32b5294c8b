"""Run methods along a stream of windows (``streams.py``): the continual protocol and the rest.

One step per batch, reset only at the start; each batch is predicted by the forward before its
update (the prediction a method returns). Images go through the model's own preprocessing, so a
32 x 32 folder feeds a 224 x 224 model as the daemon would. Cache bytes are the methods' measured
ones (NOTE [Cache bytes]). Every window is scored; windows of one group (a loop of ``long``, a
domain of ``gradual``) are also pooled.
"""

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..data import to_tensor
from ..data.domains import DomainFolder
from ..methods import args_for, get_method
from .streams import Stream, build_stream

__all__ = ["MethodRun", "run_continual", "run_stream", "run_method", "margins"]


@dataclass
class MethodRun:
    """One method over the whole stream."""

    method: str
    errors: Dict[str, float] = field(default_factory=dict)       # percent, per window
    groups: Dict[str, float] = field(default_factory=dict)       # percent, per window group
    domains: Dict[str, float] = field(default_factory=dict)      # percent, per domain (pooled)
    batch_errors: List[float] = field(default_factory=list)      # percent, along the stream
    cache_bytes: List[int] = field(default_factory=list)
    paper_bytes: List[int] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    keeps: List[float] = field(default_factory=list)
    overall_keeps: List[float] = field(default_factory=list)
    peak_bytes: List[int] = field(default_factory=list)       # per step, NOTE [Step peak]
    resident_bytes: List[int] = field(default_factory=list)   # CPU: process peak per step
    updates: int = 0
    wall_seconds: float = 0.0

    @property
    def mean_error(self) -> float:
        return statistics.mean(self.errors.values()) if self.errors else float("nan")

    def summary(self) -> Dict:
        mb = 2.0 ** 20
        return {"method": self.method, "mean_error": self.mean_error, "errors": self.errors,
                "groups": self.groups, "domains": self.domains,
                "cache_mb_max": max(self.cache_bytes, default=0) / mb,
                "cache_mb_mean": statistics.mean(self.cache_bytes) / mb if self.cache_bytes else 0,
                "paper_mb_mean": statistics.mean(self.paper_bytes) / mb if self.paper_bytes else 0,
                "step_seconds_mean": statistics.mean(self.step_seconds) if self.step_seconds else 0,
                "mean_keep": statistics.mean(self.keeps) if self.keeps else None,
                "overall_keep": (statistics.mean(self.overall_keeps) if self.overall_keeps
                                 else None),
                "peak_mb": max(self.peak_bytes, default=0) / mb,
                "peak_mb_mean": statistics.mean(self.peak_bytes) / mb if self.peak_bytes else 0,
                "resident_mb_max": max(self.resident_bytes, default=0) / mb,
                "updates": self.updates,
                "wall_seconds": self.wall_seconds}


def run_method(name: str, base: nn.Module, stream: Stream, batch_size: int,
               device: torch.device, overrides: Optional[Dict] = None, progress=None,
               preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> MethodRun:
    """Adapt a fresh copy of ``base`` with method ``name`` along the whole stream."""
    method = get_method(name)(copy.deepcopy(base).to(device), args_for(name, **(overrides or {})))
    run, tally = MethodRun(name), Tally(stream)
    start = time.perf_counter()
    for window in stream.windows:
        for i in range(0, len(window), batch_size):
            images, labels = stream.images(window, i, i + batch_size)
            x, y = to_tensor(images).to(device), torch.from_numpy(labels).to(device)
            result = method.step(preprocess(x) if preprocess is not None else x)
            right = (result.logits.argmax(1) == y).cpu().numpy()
            tally.add(window, window.block_ids[i:i + batch_size], right)
            record_step(run, result, 100.0 * (1.0 - right.mean()))
            if progress is not None:
                progress.update(1)
    tally.finish(run)
    run.wall_seconds = time.perf_counter() - start
    return run


class Tally:
    """Right answers per window, per window group and per domain."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.right: Dict[tuple, List[int]] = {}

    def add(self, window, block_ids: np.ndarray, right: np.ndarray) -> None:
        for key in (("window", window.name), ("group", window.group)):
            self._count(key, int(right.sum()), len(right))
        for block in np.unique(block_ids):
            where = block_ids == block
            domain = self.stream.blocks[int(block)][0]
            self._count(("domain", domain), int(right[where].sum()), int(where.sum()))

    def _count(self, key, right: int, seen: int) -> None:
        total = self.right.setdefault(key, [0, 0])
        total[0] += right
        total[1] += seen

    def finish(self, run: MethodRun) -> None:
        for (kind, name), (right, seen) in self.right.items():
            error = 100.0 * (1.0 - right / seen)
            if kind == "window":
                run.errors[name] = error
            elif kind == "group" and name:
                run.groups[name] = error
            elif kind == "domain":
                run.domains[name] = error


def record_step(run: MethodRun, result, batch_error: float) -> None:
    run.batch_errors.append(batch_error)
    run.cache_bytes.append(result.cache_bytes)
    run.paper_bytes.append(result.paper_bytes)
    run.step_seconds.append(result.seconds)
    run.updates += int(result.updated)
    if result.mean_keep is not None:
        run.keeps.append(result.mean_keep)
    if result.overall_keep is not None:
        run.overall_keeps.append(result.overall_keep)
    if getattr(result, "peak_bytes", None) is not None:
        run.peak_bytes.append(result.peak_bytes)
    if getattr(result, "resident_bytes", None) is not None:
        run.resident_bytes.append(result.resident_bytes)


def run_stream(base: nn.Module, methods: List[str], stream: Stream, batch_size: int = 200,
               device: Optional[torch.device] = None,
               overrides: Optional[Dict[str, Dict]] = None, progress=None,
               preprocess=None) -> List[MethodRun]:
    """Every method in ``methods`` on the same stream, one after another."""
    device = device or torch.device("cpu")
    return [run_method(name, base, stream, batch_size, device, (overrides or {}).get(name),
                       progress, preprocess) for name in methods]


def run_continual(base: nn.Module, methods: List[str], domains: DomainFolder,
                  severity: Optional[int] = 5, batch_size: int = 200,
                  limit: Optional[int] = None, seed: int = 1,
                  device: Optional[torch.device] = None,
                  overrides: Optional[Dict[str, Dict]] = None, progress=None,
                  preprocess=None, shuffle: bool = True) -> List[MethodRun]:
    """The paper's protocol: every domain once, in order."""
    stream = build_stream("continual", domains, severity, limit, seed, shuffle)
    return run_stream(base, methods, stream, batch_size, device, overrides, progress, preprocess)


def margins(runs: List[MethodRun], reference: str = "source") -> Dict[str, Dict[str, float]]:
    """Per method and window: the reference's error minus the method's (>= 0: no worse than the
    frozen model there). Empty when the reference did not run."""
    base = next((r for r in runs if r.method == reference), None)
    if base is None:
        return {}
    return {r.method: {w: base.errors[w] - e for w, e in r.errors.items()} for r in runs
            if r.method != reference}


def results_json(runs: List[MethodRun], meta: Dict) -> Dict:
    return {"meta": meta, "results": [r.summary() for r in runs],
            "margins_over_source": margins(runs),
            "streams": {r.method: asdict(r) for r in runs}}
