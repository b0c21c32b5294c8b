"""Memory and speed of one adaptation step: plain backprop against SURGEON's sparse cache.

Every configuration adapts its own copy of the same model on the same real batch with the same
loss (mean softmax entropy) and optimizer (Adam, lr 1e-3). Cache bytes are measured with the same
meter for all (NOTE [Cache bytes]); plain-autograd configurations are timed without the meter's
hooks. Rounds interleave the configurations so that drift on a busy machine hits all alike, and
the median step time is reported with its ratio to ``full`` from the same run.
"""

import copy
import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..capture import ActivationCapture, CapturePolicy, paper_bytes
from ..engine import EngineConfig, SparseBackprop, entropy
from ..methods.base import norm_modules
from ..norm import convert_batchnorm
from ..allocator import before_step
from ..opcount import OpCounter
from ..methods.surgeon import Surgeon, SurgeonArgs
from ..peak import PeakMeter

__all__ = ["ConfigResult", "run_memory_benchmark", "CONFIGS"]

CONFIGS = ("full", "tent", "surgeon", "surgeon-fp16", "surgeon-exactbn", "surgeon+budget",
           "daemon", "daemon+peak")


@dataclass
class ConfigResult:
    """One configuration's figures; ratios are against ``full`` measured in the same run."""

    config: str
    description: str
    cache_bytes: int
    paper_bytes: int
    step_seconds: float
    cache_ratio: float = 0.0
    time_ratio: float = 0.0
    mean_keep: Optional[float] = None
    budget_bytes: Optional[int] = None
    peak_step_bytes: Optional[int] = None
    peak_ratio: Optional[float] = None
    ops: Optional[int] = None             # operators dispatched by one step (kernels, no views)
    ops_ratio: Optional[float] = None
    cpu_ops: Optional[int] = None         # the same on the CPU's own paths (CPU runs only)
    cpu_ops_ratio: Optional[float] = None
    kinds: Dict[str, int] = dataclasses.field(default_factory=dict)  # "kind/role" -> bytes
    chunks: int = 1                       # micro-batches of the last step (NOTE [Peak budget])
    highest_peak_bytes: Optional[int] = None   # the largest peak of every step run, warm-up too


def _entropy_loss(model: nn.Module, x: torch.Tensor):
    logits = model(x)
    return entropy(logits).mean(), logits


class _Runner:
    """One configuration: its model copy, optimizer and a ``step(x) -> (cache, paper)``."""

    def __init__(self, name: str, description: str, model: nn.Module,
                 engine: Optional[SparseBackprop] = None, budget: Optional[int] = None,
                 method: Optional[Surgeon] = None):
        self.name, self.description, self.model = name, description, model
        self.engine, self.budget, self.method = engine, budget, method
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: CUDA's default, so the CPU's operator count is what a GPU would launch
        self.optimizer = (method.optimizer if method
                          else torch.optim.Adam(params, lr=1e-3, foreach=True))
        self.times: List[float] = []
        self.cache = self.paper = 0
        self.kinds: Dict[str, int] = {}
        self.mean_keep: Optional[float] = None
        self.peak: Optional[int] = None
        self.last_peak: Optional[int] = None   # the latest step's
        self.highest_peak: Optional[int] = None   # of every step, the warm-up's too
        self.ops: Optional[int] = None
        self.cpu_ops: Optional[int] = None
        self.chunks = 1
        self.warmups = 1   # untimed steps first

    def measure_cache(self, x: torch.Tensor) -> None:
        """Plain autograd's cache, read by the meter in passthrough mode (not timed)."""
        capture = ActivationCapture(self.model, CapturePolicy(passthrough=True))
        with capture.record() as rec:
            held = _entropy_loss(self.model, x)   # the graph lives only while its outputs do
            self.cache, self.paper = rec.cache_bytes(), paper_bytes(rec.layers())
            self.kinds = _kind_names(rec.bytes_by_kind())
        del held
        capture.close()

    def step(self, x: torch.Tensor) -> None:
        """One timed step; ``last_peak`` is its peak, metered after the free pages went back
        (NOTE [Giving memory back]), as ``Method.step`` meters its own."""
        _sync(x)
        before_step()
        start = time.perf_counter()
        if self.method is not None:   # the whole method step: its own loss, update and meter
            result = self.method.step(x)
            self.cache, self.paper, self.chunks = (result.cache_bytes, result.paper_bytes,
                                                   result.chunks)
            self.last_peak = result.peak_bytes
        else:
            with PeakMeter(x.device) as meter:
                self._update(x)
            self.last_peak = meter.peak_bytes
        _sync(x)
        self.times.append(time.perf_counter() - start)
        if self.last_peak is not None:
            self.highest_peak = max(self.highest_peak or 0, self.last_peak)

    def _update(self, x: torch.Tensor) -> None:
        if self.engine is None:
            loss, _ = _entropy_loss(self.model, x)
            loss.backward()
        else:
            report = self.engine.step(x, _entropy_loss)
            self.cache, self.paper = report.cache_bytes, report.paper_bytes
            self.kinds = _kind_names(report.kinds)
            ratios = list(report.keep_ratios.values())
            self.mean_keep = sum(ratios) / len(ratios) if ratios else None
            self.chunks = report.chunks
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _kind_names(kinds: Dict) -> Dict[str, int]:
    ordered = sorted(kinds.items(), key=lambda item: -item[1])
    return {"%s/%s" % key: size for key, size in ordered}


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _tent_model(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for m in norm_modules(model):
        m.requires_grad_(True)
    return model


def _runners(base: nn.Module, budget: Optional[int], engine_config: EngineConfig,
             peak_budget: Optional[int] = None) -> List[_Runner]:
    def fresh() -> nn.Module:
        return copy.deepcopy(base).train()

    lean, lean16 = convert_batchnorm(fresh()), convert_batchnorm(fresh())
    lossy = dataclasses.replace(engine_config, policy=dataclasses.replace(
        engine_config.policy, input_grad="fp16"))
    runners = [
        _Runner("full", "all weights, plain autograd, train-mode BN", fresh()),
        _Runner("tent", "norm affine only, plain autograd, train-mode BN", _tent_model(fresh())),
        _Runner("surgeon", "all weights, lean norm, dynamic sparsity (default)", lean,
                SparseBackprop(lean, engine_config)),
        _Runner("surgeon-fp16", "as surgeon, input-gradient tensors cast to fp16 (lossy)",
                lean16, SparseBackprop(lean16, lossy)),
    ]
    exact = fresh()
    runners.append(_Runner("surgeon-exactbn", "all weights, train-mode BN kept exact, dynamic "
                           "sparsity", exact, SparseBackprop(exact, engine_config)))
    if budget is not None:
        lean_b = convert_batchnorm(fresh())
        cfg = dataclasses.replace(engine_config, budget_bytes=budget)
        label = "surgeon under a %.1f MB budget" % (budget / 2**20)
        runners.append(_Runner("surgeon+budget", label,
                               lean_b, SparseBackprop(lean_b, cfg), budget))
    daemon = Surgeon(fresh(), SurgeonArgs())
    runners.append(_Runner("daemon", "the daemon's learner: SurgeonArgs() defaults (norm affine, "
                           "1-bit x_hat, split statistics, CSS + consistency loss, anchor)",
                           daemon.model, method=daemon))
    if torch.cuda.is_available() and next(base.parameters()).is_cuda:
        graphed = Surgeon(fresh(), SurgeonArgs(cuda_graph=True))
        runners.append(_Runner("daemon+graph", "the daemon's learner, captured once and "
                               "replayed as a CUDA graph (NOTE [Captured step]); its ops are "
                               "what a replay dispatches", graphed.model, method=graphed))
        runners[-1].warmups = 3   # eager (Adam's state), capture, a first replay
    if peak_budget is not None:
        bounded = Surgeon(fresh(), SurgeonArgs())
        bounded.engine.set_peak_budget(peak_budget)
        label = "the daemon's learner under a %.1f MB peak budget" % (peak_budget / 2**20)
        runners.append(_Runner("daemon+peak", label, bounded.model, budget=peak_budget,
                               method=bounded))
    return runners


def run_memory_benchmark(model: nn.Module, x: torch.Tensor, steps: int = 5,
                         budget_bytes: Optional[int] = None,
                         engine_config: Optional[EngineConfig] = None,
                         peak_budget_bytes: Optional[int] = None) -> List[ConfigResult]:
    """Run every configuration ``steps`` timed rounds (after one warm-up) on batch ``x``."""
    runners = _runners(model, budget_bytes, engine_config or EngineConfig(), peak_budget_bytes)
    for runner in runners:
        if runner.engine is None and runner.method is None:
            runner.measure_cache(x)
        for _ in range(runner.warmups):   # allocator, kernels, first probe (a capture)
            runner.step(x)
        runner.times.clear()
    for _ in range(steps):
        for runner in runners:
            runner.step(x)
    for runner in runners:
        runner.ops = _ops_per_step(runner, x)
        if x.device.type == "cpu":
            runner.cpu_ops = _ops_per_step(runner, x, gpu_paths=False)
        runner.peak = _peak_step_bytes(runner, x)   # last: the table's figures are its step's
    return _results(runners)


def _peak_step_bytes(runner: _Runner, x: torch.Tensor) -> Optional[int]:
    """One more, untimed step for its peak (NOTE [Step peak]): CUDA's allocator peak, or on
    the CPU the kernel's resident high-water mark."""
    runner.step(x)
    runner.times.pop()
    return runner.last_peak


def _ops_per_step(runner: _Runner, x: torch.Tensor, gpu_paths: bool = True) -> int:
    """One more, untimed step under the OpCounter (on the GPU's paths: ``gpu_path``, unless
    ``gpu_paths`` is False)."""
    with OpCounter(gpu_paths) as ops:
        runner.step(x)
    runner.times.pop()
    return ops.kernels


def _results(runners: List[_Runner]) -> List[ConfigResult]:
    out = [ConfigResult(r.name, r.description, r.cache, r.paper, statistics.median(r.times),
                        mean_keep=r.mean_keep, budget_bytes=r.budget, peak_step_bytes=r.peak,
                        ops=r.ops, cpu_ops=r.cpu_ops, kinds=r.kinds, chunks=r.chunks,
                        highest_peak_bytes=r.highest_peak)
           for r in runners]
    full = out[0]
    for res in out:
        res.cache_ratio = res.cache_bytes / full.cache_bytes if full.cache_bytes else 0.0
        res.time_ratio = res.step_seconds / full.step_seconds if full.step_seconds else 0.0
        res.ops_ratio = _ratio(res.ops, full.ops)
        res.cpu_ops_ratio = _ratio(res.cpu_ops, full.cpu_ops)
        res.peak_ratio = _ratio(res.peak_step_bytes, full.peak_step_bytes)
    return out


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    """``value / base``, or None where either was not measured (or ``base`` is 0)."""
    return value / base if value is not None and base else None


def as_rows(results: List[ConfigResult]) -> List[Dict]:
    return [asdict(r) for r in results]
