"""surgeon: SURGEON's recipe on the real-memory engine: dynamic per-layer activation sparsity,
certainty-based sample selection (CSS) and consistency regularisation (CR).

Paper: Ma et al., SURGEON: Memory-Adaptive Fully Test-Time Adaptation via Dynamic Activation
Sparsity, CVPR 2025 (arXiv 2503.20354). Upstream: kadmkbl/SURGEON (methods/das.py).
Published-code reproduction: ``params="bn_gamma", variant="published", probe_every=1``.
"""

import math
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..capturable import CapturedStep
from ..capture import INPUT_GRAD_POLICIES, CapturePolicy
from ..engine import EngineConfig, SparseBackprop, budget_or_none, mean_keep
from ..norm import (STATISTICS, XHAT_BITS, RunningStatNorm2d, convert_batchnorm, shift_gates,
                    split_statistics)
from .augment import cotta_augment, device_draw
from .base import Method, StepResult, bn_modules, entropy, norm_modules
from .registry import register

PARAM_SETS = ("all", "norm", "bn", "bn_gamma")
SURGEON_STATISTICS = STATISTICS + ("split",)


@dataclass(frozen=True)
class SurgeonArgs:
    """SURGEON's options; defaults are the lean configuration the daemon runs.

    Attributes:
        lr: Adam learning rate; ``None`` picks the published code's (1e-3 for BN parameters,
            2.2e-5 when every weight trains).
        params: ``norm`` affine (default: every BatchNorm, as the published runs at lr 1e-3, and
            LayerNorm/GroupNorm in models that have them), ``bn`` (BatchNorm only), ``all``
            weights, or ``bn_gamma`` (the published code's exact choice: beta never moves).
        lean_norm: running-statistics normalisation (NOTE [Lean normalisation]); False keeps
            train-mode BatchNorm exact.
        statistics: what the lean norm normalises with while adapting: ``split`` (default,
            NOTE [Split statistics]: the first ``shallow_share`` of the norms on each batch's
            statistics, the deeper ones on running statistics averaged over the current domain,
            which the shallow ones detect with ``shift_scale``), ``batch`` (every norm: the same
            forward as train-mode BatchNorm; wrong on class-correlated batches) or ``running``
            (every norm on its running statistics just updated from the batch). ``lag_deep``:
            the deep norms normalise a batch with the statistics from before it.
        running_after: with ``statistics="batch"``, only the first N lean norms (in module order:
            the shallow ones) use batch statistics and the deeper ones their running statistics
            (class-correlated batches move deep statistics most; an experiment of issue 14).
        gate_scale, momentum: how the running statistics follow the stream: MECTA's forget gate
            with this scale (default 1.0), or ``gate_scale=None`` and a fixed ``momentum``
            (default: each BatchNorm's own).
        anchor: after each update every trained weight moves this share of the way back to
            its source value (ROID's weight ensembling): bounds drift on long streams.
        anchor_ramp: the anchor's share grows linearly from 0 over this many updates after
            the source (start or reset): young weights are not yet drifting, and pulling them
            back only slows the first adaptation (0: the full share from the first update).
        xhat_bits: how the lean norm keeps x_hat (NOTE [Quantised x_hat]): 1 (default) its sign,
            2 a 2-bit code, 0 x_hat itself pruned at the layer's dynamic keep ratio (the paper's
            activation sparsity; ``static`` compares against this).
        margin: CSS keeps samples with entropy below ``margin * ln C``.
        consistency_weight: CR weight; ``None`` is the published 0.01 * C; 0 turns CR off.
        variant, keep_floor, probe_every, fixed_keep, value_dtype: see EngineConfig/CapturePolicy.
        input_grad: how tensors the input gradient reads are kept (norm inputs in LayerNorm
            models, GELU/SiLU/hardswish inputs, attention): ``exact`` (default) or the lossy
            ``fp16``/``bf16`` casts, half the bytes (see CapturePolicy).
        budget_mb: cap on the measured activation cache.
        cuda_graph: on a CUDA device, capture the step once and replay it as a CUDA graph
            where it can be (NOTE [Captured step] in capturable.py: keep ratios that do not
            change, as the 1-bit x_hat default's, and a step in one part); elsewhere, and where
            a capture fails, steps run eagerly.
    """

    lr: Optional[float] = None
    params: str = "norm"
    lean_norm: bool = True
    statistics: str = "split"
    running_after: Optional[int] = None
    shallow_share: float = 0.35
    shift_scale: float = 3.0
    lag_deep: bool = False
    anchor: float = 0.01
    anchor_ramp: int = 100
    gate_scale: Optional[float] = 1.0
    momentum: Optional[float] = None
    xhat_bits: int = 1
    margin: float = 0.4
    consistency_weight: Optional[float] = None
    variant: str = "paper"
    keep_floor: float = 0.0
    probe_every: int = 0
    fixed_keep: Optional[float] = None
    value_dtype: str = "fp16"
    input_grad: str = "exact"
    budget_mb: Optional[float] = None
    seed: int = 0
    cuda_graph: bool = False

    def __post_init__(self):
        if self.params not in PARAM_SETS:
            raise ValueError("params must be one of %s, got %r" % (PARAM_SETS, self.params))
        if self.xhat_bits not in XHAT_BITS:
            raise ValueError("xhat_bits must be one of %s, got %r" % (XHAT_BITS, self.xhat_bits))
        if self.statistics not in SURGEON_STATISTICS:
            raise ValueError("statistics must be one of %s, got %r"
                             % (SURGEON_STATISTICS, self.statistics))
        if not 0.0 < self.shallow_share <= 1.0:
            raise ValueError("shallow_share must be in (0, 1], got %r" % (self.shallow_share,))
        if not 0.0 <= self.anchor < 1.0:
            raise ValueError("anchor must be in [0, 1), got %r" % (self.anchor,))
        if self.anchor_ramp < 0:
            raise ValueError("anchor_ramp must be >= 0, got %r" % (self.anchor_ramp,))
        if not self.shift_scale > 0:
            raise ValueError("shift_scale must be > 0, got %r" % (self.shift_scale,))
        if self.running_after is not None and self.running_after < 0:
            raise ValueError("running_after must be >= 0, got %r" % (self.running_after,))
        if self.momentum is not None and not 0.0 < self.momentum <= 1.0:
            raise ValueError("momentum must be in (0, 1], got %r" % (self.momentum,))
        if self.input_grad not in INPUT_GRAD_POLICIES:
            raise ValueError("input_grad must be one of %s, got %r"
                             % (INPUT_GRAD_POLICIES, self.input_grad))
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be > 0, got %r" % (self.lr,))

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2.2e-5 if self.params == "all" else 1e-3

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy=CapturePolicy(value_dtype=self.value_dtype,
                                                 input_grad=self.input_grad),
                            variant=self.variant, keep_floor=self.keep_floor,
                            budget_bytes=budget_or_none(self.budget_mb),
                            probe_every=self.probe_every, fixed_keep=self.fixed_keep)


def configure_model(model: nn.Module, args: SurgeonArgs) -> nn.Module:
    """Lean or train-mode normalisation, then mark the chosen parameter set trainable."""
    if args.lean_norm:
        statistics = "batch" if args.statistics == "split" else args.statistics
        convert_batchnorm(model, args.gate_scale, statistics, args.xhat_bits)
        norms = [m for m in model.modules() if isinstance(m, RunningStatNorm2d)]
        if args.statistics == "split" and norms:
            split_statistics(model, round(args.shallow_share * len(norms)), args.shift_scale,
                             args.lag_deep)
        for index, m in enumerate(norms):
            if args.momentum is not None:
                m.momentum = args.momentum
            if args.running_after is not None and index >= args.running_after:
                m.statistics = "running"
    model.train().requires_grad_(args.params == "all")
    if args.params != "all":
        chosen = norm_modules(model) if args.params == "norm" else \
            [m for m in bn_modules(model) if m.weight is not None]
        for m in chosen:
            m.weight.requires_grad_(True)
            if m.bias is not None:
                m.bias.requires_grad_(args.params != "bn_gamma")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("params=%s selects no parameter of this model (it has no %s with "
                         "affine parameters); use params=norm or all"
                         % (args.params, "normalisation layer" if args.params == "norm"
                            else "BatchNorm"))
    return model


def css_entropy(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Certainty-weighted entropy of the samples under ``margin * ln C``; 0 when none qualify."""
    threshold = margin * math.log(logits.shape[1])
    ent = entropy(logits)
    keep = (ent < threshold).float()
    weight = torch.exp(threshold - ent).detach() * keep
    return (weight * ent).sum() / keep.sum().clamp(min=1.0)


def consistency(logits: torch.Tensor, logits_aug: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the clean and the augmented predictions (gradients through both)."""
    return -(logits.softmax(1) * logits_aug.log_softmax(1)).sum(1).mean()


@register("surgeon")
class Surgeon(Method):
    """CSS + CR on the sparse engine; predictions from the clean forward before the update."""

    def __init__(self, model: nn.Module, args: SurgeonArgs = SurgeonArgs()):
        configure_model(model, args)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(model, torch.optim.Adam(params, lr=args.learning_rate(), foreach=True))
        self.args = args
        self.engine = SparseBackprop(model, args.engine_config())
        self._rng = random.Random(args.seed)
        self._selected = 0
        self.updates = 0   # since the source weights: the anchor's ramp reads it
        # the jitter order of augmentations drawn on the device, while a captured step runs
        # (NOTE [Captured step]); None: drawn on the host from ``_rng``
        self._device_draws: Optional[Tuple[int, ...]] = None
        self.captured = CapturedStep(self) if args.cuda_graph else None

    def reset(self) -> None:
        super().reset()
        self.updates = 0
        if self.captured is not None:
            self.captured.drop()
        self.engine.forget()
        for gate in shift_gates(self.model):
            gate.restart()

    def anchor_rate(self) -> float:
        """This update's pull toward the source (``anchor``, ramped in over ``anchor_ramp``)."""
        ramp = self.args.anchor_ramp
        return self.args.anchor * (min(1.0, self.updates / ramp) if ramp > 0 else 1.0)

    def state_dict(self):
        return dict(super().state_dict(), updates=self.updates)

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))

    def consistency_weight(self, logits: torch.Tensor) -> float:
        """CR's weight: as set, or the published 0.01 * classes."""
        weight = self.args.consistency_weight
        return 0.01 * logits.shape[1] if weight is None else weight

    def _forward_loss(self, model: nn.Module, x: torch.Tensor):
        logits = model(x)
        threshold = self.args.margin * math.log(logits.shape[1])
        selected = (entropy(logits.detach()) < threshold).sum()
        self._selected = self._selected + selected   # over the micro-batches; read after
        weight = self.consistency_weight(logits)
        order = self._device_draws
        # read only when it decides something: with the consistency loss every step has a
        # backward, and a read here would stall a GPU between the two forwards. A captured
        # step reads nothing: its backward of a zero loss changes nothing.
        if weight <= 0 and order is None and int(selected) == 0:   # nothing to learn from
            return logits.new_zeros(()), logits
        loss = css_entropy(logits, self.args.margin)
        if weight > 0:
            draw = None if order is None else device_draw(x, order)
            loss = loss + weight * consistency(logits, model(cotta_augment(x, self._rng, draw)))
        return loss, logits

    def _adapt(self, x: torch.Tensor) -> StepResult:
        if self.captured is not None:   # None where it cannot be captured: eager
            result = self.captured.step(x)
            if result is not None:
                return result
        self._selected = 0
        report = self.engine.step(x, self._forward_loss)
        updated = not report.skipped and self.apply_update()
        if updated:
            self.updates += 1
            self.pull_to_source(self.anchor_rate())
        return StepResult(report.logits, report.loss, report.cache_bytes, report.paper_bytes,
                          updated=updated, selected=int(self._selected),
                          mean_keep=mean_keep(report.keep_ratios),
                          overall_keep=report.overall_keep, chunks=report.chunks)


@dataclass(frozen=True)
class StaticArgs(SurgeonArgs):
    """The static-sparsity baseline: SURGEON's machinery with one keep ratio for every layer."""

    fixed_keep: Optional[float] = 0.1
    xhat_bits: int = 0   # the ratios must act on x_hat itself


@register("static")
class StaticSparsity(Surgeon):
    """Same loss and engine as surgeon, but every trained layer keeps ``fixed_keep``."""

    def __init__(self, model: nn.Module, args: StaticArgs = StaticArgs()):
        if args.fixed_keep is None:
            raise ValueError("static needs fixed_keep (one keep ratio for every layer)")
        super().__init__(model, args)
