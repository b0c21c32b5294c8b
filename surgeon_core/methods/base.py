"""What every TTA method shares: the step result, reset snapshots, the NaN guard, the meter.

Usage (any registered method)::

    method = get_method("tent")(model, TentArgs())
    for x in stream:
        result = method.step(x)          # logits from before this batch's update
    method.reset()                       # back to the source weights, exactly
"""

import copy
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..capture import ActivationCapture, CapturePolicy, paper_bytes
from ..engine import entropy, statistics_kept
from ..allocator import after_step, before_step
from ..peak import PeakMeter

__all__ = ["StepResult", "Method", "bn_modules", "norm_modules", "use_batch_statistics",
           "quiet_stochastic_layers", "entropy"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm)


@dataclass
class StepResult:
    """One batch: the prediction logits (before the update) and what the update cost."""

    logits: torch.Tensor
    loss: float = 0.0
    cache_bytes: int = 0          # measured, see NOTE [Cache bytes]
    paper_bytes: int = 0          # the published code's convention
    seconds: float = 0.0
    updated: bool = False         # False when nothing was selected or the step was not finite
    selected: Optional[int] = None
    mean_keep: Optional[float] = None   # sparse methods: mean keep ratio of the trained layers
    overall_keep: Optional[float] = None   # sparse methods: kept / prunable values (trainable)
    peak_bytes: Optional[int] = None       # the step's peak above its start, NOTE [Step peak]
    reserved_bytes: Optional[int] = None   # CUDA: the caching allocator's peak reservation
    resident_bytes: Optional[int] = None   # CPU: the process's resident peak during the step
    chunks: int = 1                        # micro-batches the step ran in (NOTE [Peak budget])


def bn_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def norm_modules(model: nn.Module) -> List[nn.Module]:
    """Normalisation layers with affine parameters: BatchNorm (and ours), LayerNorm (ConvNeXt's
    channels-first one too), GroupNorm, InstanceNorm."""
    return [m for m in model.modules()
            if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None]


def quiet_stochastic_layers(model: nn.Module) -> None:
    """Dropout and stochastic depth off for good (p = 0, so ``train()`` cannot turn them back
    on): adaptation then predicts, and learns from, the network that serving runs."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif type(m).__name__ in ("StochasticDepth", "DropPath"):
            for name in ("p", "drop_prob"):
                if isinstance(getattr(m, name, None), float):
                    setattr(m, name, 0.0)


def use_batch_statistics(model: nn.Module) -> None:
    """Normalise with each test batch's statistics, in train and eval mode alike (tent's trick)."""
    for m in bn_modules(model):
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every value is finite, in a few fused operators and one host read per device: a
    NaN or an infinity anywhere makes its tensor's norm non-finite (so does a norm past fp32's
    range, values near 1e19: no gradient worth applying). Per-tensor ``isfinite().all()`` cost
    six operators a tensor, each a kernel launch on a GPU."""
    totals = [torch.stack(torch._foreach_norm(group)).sum()
              for group in _fusable_groups(tensors)]
    return all(bool(torch.isfinite(total)) for total in totals)


def _fusable_groups(items: list, key=lambda tensor: tensor) -> List[list]:
    """Items grouped by their tensor's (``key``) device and dtype: what one foreach operator
    accepts."""
    groups: Dict[Tuple[torch.device, torch.dtype], list] = {}
    for item in items:
        tensor = key(item)
        groups.setdefault((tensor.device, tensor.dtype), []).append(item)
    return list(groups.values())


class Method:
    """Base of every method: owns the adapted model, its optimizer and one source snapshot.

    Subclasses implement ``_adapt(x) -> StepResult``; ``step`` times it and guards the update.
    """

    name = "base"

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        quiet_stochastic_layers(model)
        self.model = model
        self.optimizer = optimizer
        self._source = self._snapshot()
        self._meter: Optional[ActivationCapture] = None
        self._primed = False

    def _snapshot(self) -> Dict[str, Any]:
        state = {"model": copy.deepcopy(self.model.state_dict())}
        if self.optimizer is not None:
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def reset(self) -> None:
        """Restore the weights, statistics and optimizer state captured at construction."""
        self.model.load_state_dict(self._source["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._source["optimizer"])
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> Dict[str, Any]:
        state = {"model": self.model.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def step(self, x: torch.Tensor) -> StepResult:
        if not self._primed:
            self._prime(x)
        before_step()      # NOTE [Giving memory back]
        start = time.perf_counter()
        with PeakMeter(x.device) as meter:
            result = self._adapt(x)
        result.seconds = time.perf_counter() - start
        if result.peak_bytes is None:   # a replayed graph reports its pool (capturable.py)
            result.peak_bytes, result.reserved_bytes = meter.peak_bytes, meter.reserved_bytes
        result.resident_bytes = meter.resident_bytes
        after_step()
        return result

    def _adapt(self, x: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def _prime(self, x: torch.Tensor) -> None:
        """A forward and backward on two samples before the first step's meter: the libraries'
        one-time allocations happen here and not in a step's peak (NOTE [Peak budget]). It
        leaves no trace: statistics, random state and which weights train (a layer may switch
        its own, as MECTA's stop criterion does) are restored, and gradients cleared."""
        self._primed = True
        trains = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.zero_grad(set_to_none=True)
        devices = [x.device] if x.device.type == "cuda" else []
        with statistics_kept(self.model), torch.random.fork_rng(devices):
            out = self.model(x[:2])
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.float().sum().backward()
            del out
        for param, trained in trains:
            param.requires_grad_(trained)
        self.model.zero_grad(set_to_none=True)

    def apply_update(self) -> bool:
        """Optimizer step only if every gradient is finite: no NaN ever reaches the weights."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        finite = bool(grads) and all_finite(grads)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    @torch.no_grad()
    def pull_to_source(self, rate: float) -> None:
        """Move every trainable weight ``rate`` of the way back to its source value (ROID's
        weight ensembling with the source): adaptation can wander no further than the
        gradients push against it, on any horizon. Statistics are left to follow the stream."""
        if rate <= 0:
            return
        source = self._source["model"]
        pairs = [(p, source[n]) for n, p in self.model.named_parameters()
                 if p.requires_grad and n in source]
        for group in _fusable_groups(pairs, key=lambda pair: pair[0]):   # one fused update each
            torch._foreach_lerp_([p for p, _ in group],
                                 [s.to(p.device, p.dtype) for p, s in group], rate)

    def metered_forward(self, fn, *args) -> Tuple[Any, int, int]:
        """Run ``fn`` under a passthrough meter: plain autograd, its cache measured."""
        if self._meter is None:
            self._meter = ActivationCapture(self.model, CapturePolicy(passthrough=True))
        with self._meter.record() as rec:
            out = fn(*args)
            layers = rec.layers()
            return out, rec.cache_bytes(), paper_bytes(layers)
