"""Layer importance, keep ratios, and the budget solver that makes them fit a byte budget.

SURGEON scores each prunable layer i by
    G_i = RMS of its weight gradient,   M_i = ln(A_total / A_i),   A_i = its activation size,
and keeps a fraction I_i / max_j I_j of its cached activation. The paper combines min-max
normalised terms, I = Norm(M) * Norm(G); the published code multiplies the raw terms, I = G * M.
Both are here (``variant``), keyed by module name (the published code pairs them by position,
which misaligns layers in BN-only mode). A ``floor`` keeps every trained layer above zero.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch

from .capture import LayerCache, Role, check_keep_ratio
from .errors import BudgetExceeded
from .sparsity import capacity_for, quantile_sample, sampling_margin

__all__ = ["VARIANTS", "gradient_importance", "memory_importance", "keep_ratios",
           "CacheProfile", "BudgetPlan", "solve_budget"]

VARIANTS = ("paper", "published")


def gradient_importance(weight_of: Callable[[str], Optional[torch.Tensor]],
                        layers) -> Dict[str, float]:
    """RMS of each named layer's weight gradient; layers without a gradient are left out.

    ``weight_of`` maps a layer key to its parameter (``ActivationCapture.weight_of``). The norms
    come from one multi-tensor operator and are read back in one transfer.
    """
    names, grads = [], []
    for name in layers:
        weight = weight_of(name)
        if weight is not None and weight.grad is not None:
            names.append(name)
            grads.append(weight.grad.detach().float())
    if not grads:
        return {}
    norms = torch.stack(torch._foreach_norm(grads)).tolist()
    return {name: norm / math.sqrt(grad.numel())
            for name, norm, grad in zip(names, norms, grads)}


def memory_importance(sizes: Mapping[str, int]) -> Dict[str, float]:
    """M_i = ln(sum of sizes / size_i): large activations score low and are pruned harder."""
    total = float(sum(sizes.values()))
    return {name: math.log(total / size) for name, size in sizes.items() if size > 0}


def _min_max(scores: Mapping[str, float]) -> Dict[str, float]:
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo <= 0 or not math.isfinite(hi - lo):
        return {k: 1.0 for k in scores}
    return {k: (v - lo) / (hi - lo) for k, v in scores.items()}


def keep_ratios(grad_imp: Mapping[str, float], mem_imp: Mapping[str, float],
                variant: str = "paper", floor: float = 0.0) -> Dict[str, float]:
    """Per-layer keep ratios I_i / max I, at least ``floor``, for layers with both scores.

    Raises:
        ValueError: unknown variant or a floor outside [0, 1].
    """
    if variant not in VARIANTS:
        raise ValueError("variant must be one of %s, got %r" % (VARIANTS, variant))
    check_keep_ratio("floor", floor)
    names = [n for n in mem_imp if n in grad_imp and math.isfinite(grad_imp[n])]
    if not names:
        return {}
    g = {n: grad_imp[n] for n in names}
    m = {n: mem_imp[n] for n in names}
    if variant == "paper":
        g, m = _min_max(g), _min_max(m)
    scores = {n: g[n] * m[n] for n in names}
    best = max(scores.values())
    if best <= 0:
        return {n: 1.0 for n in names}
    return {n: min(1.0, max(floor, s / best)) for n, s in scores.items()}


def pruned_cost(numel: float, keep: float, value_bytes: int, sync_free: bool = False,
                selection: str = "threshold") -> float:
    """Upper bound on the bytes a pruned tensor costs at ``keep``; mirrors the packed forms.

    See NOTE [Pruned format] and NOTE [Sync-free packing] in sparsity.py.
    """
    if keep <= 0:
        return 0.0
    numel = math.ceil(numel)
    mask_bytes = math.ceil(numel / 8)
    if sync_free:
        return mask_bytes + value_bytes * (capacity_for(numel, keep, selection) + 1)  # slot 0
    if selection == "threshold" and keep < 1:
        keep = min(1.0, keep + sampling_margin(keep, quantile_sample(sync_free=False)))
    kept = keep * numel + 1  # rounding of the kept count
    return min(mask_bytes + value_bytes * kept, (4 + value_bytes) * kept)


@dataclass
class CacheProfile:
    """Per-sample cache structure measured from one record: fixed bytes + prunable layer sizes."""

    fixed_per_sample: float
    numel_per_sample: Dict[str, float]
    value_bytes: int
    sync_free: bool = False
    selection: str = "threshold"

    @staticmethod
    def fixed_bytes_per_sample(layers: Mapping[str, LayerCache], cache_bytes: int,
                               batch_size: int) -> float:
        """Bytes per sample of everything not pruned, from a record read before backward."""
        pruned_bytes = sum(c.nbytes for c in layers.values() if c.role == Role.WEIGHT_GRAD)
        return max(0, cache_bytes - pruned_bytes) / batch_size

    def predict(self, ratios: Mapping[str, float], batch_size: int) -> float:
        """Upper estimate of the cache at ``ratios`` for ``batch_size`` samples."""
        total = self.fixed_per_sample * batch_size
        for name, per_sample in self.numel_per_sample.items():
            total += pruned_cost(per_sample * batch_size, ratios.get(name, 1.0), self.value_bytes,
                                 self.sync_free, self.selection)
        return total


@dataclass(frozen=True)
class BudgetPlan:
    """The ratios a step will use, the cache they are predicted to cost, and the scale applied."""

    keep_ratios: Dict[str, float]
    predicted_bytes: int
    scale: float


def _scaled(base: Mapping[str, float], names, scale: float, floor: float) -> Dict[str, float]:
    return {n: min(1.0, max(floor, base.get(n, 1.0) * scale)) for n in names}


def solve_budget(profile: CacheProfile, base: Mapping[str, float], budget_bytes: int,
                 batch_size: int, floor: float = 0.0) -> BudgetPlan:
    """Scale ``base`` ratios by the largest factor whose predicted cache fits ``budget_bytes``.

    Ratios may grow (up to 1) when the budget allows more than ``base`` needs, so a larger budget
    buys accuracy, and shrink down to ``floor`` when it allows less.

    Raises:
        ValueError: a budget <= 0.
        BudgetExceeded: even every layer at ``floor`` does not fit.
    """
    if not budget_bytes > 0:
        raise ValueError("budget must be > 0 bytes, got %r" % (budget_bytes,))
    names = list(profile.numel_per_sample)
    at_floor = profile.predict(_scaled(base, names, 0.0, floor), batch_size)
    if at_floor > budget_bytes:
        raise BudgetExceeded(budget_bytes, int(at_floor))
    positive = [base.get(n, 1.0) for n in names if base.get(n, 1.0) > 0]
    hi = 1.0 / min(positive) if positive else 1.0
    lo = 0.0
    if profile.predict(_scaled(base, names, hi, floor), batch_size) <= budget_bytes:
        lo = hi
    for _ in range(50):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        fits = profile.predict(_scaled(base, names, mid, floor), batch_size) <= budget_bytes
        lo, hi = (mid, hi) if fits else (lo, mid)
    ratios = _scaled(base, names, lo, floor)
    return BudgetPlan(ratios, int(profile.predict(ratios, batch_size)), lo)


def weights_needing_grad(weight_of: Callable[[str], Optional[torch.Tensor]],
                         layers) -> Dict[str, bool]:
    """Whether each named layer's weight is trained (a frozen layer needs no cached input)."""
    out = {}
    for name in layers:
        weight = weight_of(name)
        out[name] = weight is not None and weight.requires_grad
    return out
