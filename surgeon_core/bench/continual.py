"""Continual adaptation over a folder of domains (CIFAR-10-C: 15 corruptions in the fixed
order), reset only at the start.

One step per batch; each batch is predicted by the forward before its update (the prediction a
method returns). Every domain's images are shuffled by the same seeded permutation, as the
published SURGEON code does (``shuffle=False`` keeps the folder's order). Images go through the
model's own preprocessing, so a 32 x 32 folder feeds a 224 x 224 model as the daemon would.
Cache bytes are the methods' measured ones (NOTE [Cache bytes]).
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

__all__ = ["MethodRun", "run_continual", "run_method"]


@dataclass
class MethodRun:
    """One method over the whole stream."""

    method: str
    errors: Dict[str, float] = field(default_factory=dict)       # percent, per corruption
    batch_errors: List[float] = field(default_factory=list)      # percent, along the stream
    cache_bytes: List[int] = field(default_factory=list)
    paper_bytes: List[int] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    keeps: List[float] = field(default_factory=list)
    overall_keeps: List[float] = field(default_factory=list)
    peak_bytes: int = 0
    updates: int = 0
    wall_seconds: float = 0.0

    @property
    def mean_error(self) -> float:
        return statistics.mean(self.errors.values()) if self.errors else float("nan")

    def summary(self) -> Dict:
        mb = 2.0 ** 20
        return {"method": self.method, "mean_error": self.mean_error, "errors": self.errors,
                "cache_mb_max": max(self.cache_bytes, default=0) / mb,
                "cache_mb_mean": statistics.mean(self.cache_bytes) / mb if self.cache_bytes else 0,
                "paper_mb_mean": statistics.mean(self.paper_bytes) / mb if self.paper_bytes else 0,
                "step_seconds_mean": statistics.mean(self.step_seconds) if self.step_seconds else 0,
                "mean_keep": statistics.mean(self.keeps) if self.keeps else None,
                "overall_keep": (statistics.mean(self.overall_keeps) if self.overall_keeps
                                 else None),
                "peak_mb": self.peak_bytes / mb, "updates": self.updates,
                "wall_seconds": self.wall_seconds}


def _peak_probe(device: torch.device) -> Callable[[], int]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: torch.cuda.max_memory_allocated(device)
    import psutil

    process = psutil.Process()
    return lambda: process.memory_info().rss


def run_method(name: str, base: nn.Module, domains: DomainFolder, severity: Optional[int],
               batch_size: int, limit: Optional[int], seed: int, device: torch.device,
               overrides: Optional[Dict] = None, progress=None,
               preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               shuffle: bool = True) -> MethodRun:
    """Adapt a fresh copy of ``base`` with method ``name`` along every domain in order."""
    method = get_method(name)(copy.deepcopy(base).to(device), args_for(name, **(overrides or {})))
    run, peak = MethodRun(name), _peak_probe(device)
    start = time.perf_counter()
    for domain in domains.domains:
        images, labels = domains.load(domain, severity, limit)
        order = np.random.default_rng(seed).permutation(len(images)) if shuffle \
            else np.arange(len(images))
        x_all, y_all = to_tensor(images[order]), torch.from_numpy(labels[order])
        wrong = 0
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            result = method.step(preprocess(x) if preprocess is not None else x)
            batch_wrong = int((result.logits.argmax(1) != y).sum())
            wrong += batch_wrong
            _record(run, result, 100.0 * batch_wrong / len(y))
            run.peak_bytes = max(run.peak_bytes, peak())
            if progress is not None:
                progress.update(1)
        run.errors[domain] = 100.0 * wrong / len(x_all)
    run.wall_seconds = time.perf_counter() - start
    return run


def _record(run: MethodRun, result, batch_error: float) -> None:
    run.batch_errors.append(batch_error)
    run.cache_bytes.append(result.cache_bytes)
    run.paper_bytes.append(result.paper_bytes)
    run.step_seconds.append(result.seconds)
    run.updates += int(result.updated)
    if result.mean_keep is not None:
        run.keeps.append(result.mean_keep)
    if result.overall_keep is not None:
        run.overall_keeps.append(result.overall_keep)


def run_continual(base: nn.Module, methods: List[str], domains: DomainFolder,
                  severity: Optional[int] = 5, batch_size: int = 200,
                  limit: Optional[int] = None, seed: int = 1,
                  device: Optional[torch.device] = None,
                  overrides: Optional[Dict[str, Dict]] = None, progress=None,
                  preprocess=None, shuffle: bool = True) -> List[MethodRun]:
    """Every method in ``methods`` on the same stream, one after another."""
    device = device or torch.device("cpu")
    return [run_method(name, base, domains, severity, batch_size, limit, seed, device,
                       (overrides or {}).get(name), progress, preprocess, shuffle)
            for name in methods]


def results_json(runs: List[MethodRun], meta: Dict) -> Dict:
    return {"meta": meta, "results": [r.summary() for r in runs],
            "streams": {r.method: asdict(r) for r in runs}}
