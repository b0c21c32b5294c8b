"""One adaptation step with SURGEON's dynamic activation sparsity and a measured, budgeted cache.

Usage::

    engine = SparseBackprop(model, EngineConfig(budget_bytes=30 * 2**20))
    optimizer = torch.optim.Adam(params, lr=1e-3)
    report = engine.step(x, lambda m, x: entropy_loss(m(x)))   # forward, measure, backward
    optimizer.step(); optimizer.zero_grad()

The engine owns no optimizer and picks no loss: methods do. It plans keep ratios (importance,
then the budget solver), opens a capture record around the caller's forward, reads the cache
when backward starts (NOTE [Cache bytes]) and runs backward.

NOTE [Peak budget]
A box runs out of memory at the step's peak, not at its cache: the dense forward, the packing
temporaries and the consistency loss's augmentation add to the cache while they live (ResNet-20
at batch 200: cache 18 MiB, peak 82 MiB). With ``peak_budget_bytes`` each step's peak is
measured (NOTE [Step peak]) and what it needed above its cache is remembered per micro-batch
size: the largest of the last ``TRANSIENT_STEPS`` at that size, never from the engine's first
step. Planning gives the cache what the peak budget leaves after the transients and fits it in
this order: keep ratios shrink (the solver), then the batch runs as 2, 4, 8 ... micro-batches
of at least ``min_chunk`` samples. Micro-batches keep the images per update (their gradients
add up) and cost only smaller kernels, so they come before a smaller batch, which is the
caller's to choose when even they do not fit (``BudgetExceeded``). Each micro-batch normalises
with its own statistics, as a batch of its size would.

Estimates err high, because a step over the budget cannot be taken back:
- A size not measured yet needs what the next larger size needed or, above every measured
  size, its share in proportion to the size that needed the most per sample. Not a line
  through the two largest: one low reading at the larger size flattened it, and under
  tcmalloc a part of 32 planned at 4.3 MiB peaked at 22 MiB against a 16 MiB budget.
- The margin on a transient is the widest swing seen between readings at one size, 10 % at
  least and twice at most. Under glibc's ``return`` mode readings agree within a few per cent;
  under tcmalloc its spans' slack swings them up to 1.7x (14.3 and 20.3 MiB in consecutive
  steps at 32 samples).
- A part grows at most to twice the largest size measured in two steps (so that its swing is
  known), unless a bound that needs no measurement fits: ``PRIOR_FACTOR`` times the bytes
  every module's output took in the loss's forwards (ResNet-20 at batch 64: 320 MiB for
  surgeon, 640 for the daemon's recipe with its two forwards, against their measured 17-30
  MiB). Until something is measured and where that bound does not fit, steps run in the
  smallest chunks. Without it a box with gigabytes to spare ran its first steps in parts of
  8 samples, whose statistics are noisier: the demo's clean segment read 87.2-87.3 % against
  89.5 %.
- The importance probe runs before the step's forward and its graph is gone before that
  starts, so it must fit the budget alone: it takes as many samples (up to ``probe_samples``)
  as its measured cost per sample leaves room for; until that is measured, all of them where
  the bound above fits, else 2.
- The libraries' one-time allocations (the CPU's convolution primitives and scratch: 12 MiB
  for ResNet-20) are made before the first step's meter starts (``Method.step`` primes the
  model): they stay in the process, which the footprint counts, and are no step's transient.
"""

import collections
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .capture import (ActivationCapture, CapturePolicy, LayerCache, check_keep_ratio,
                      paper_bytes, prunable_sizes)
from .errors import BudgetExceeded
from .norm import shift_gates
from .peak import PeakMeter
from .importance import (VARIANTS, BudgetPlan, CacheProfile, gradient_importance, keep_ratios,
                         memory_importance, solve_budget, weights_needing_grad)

__all__ = ["EngineConfig", "StepReport", "SparseBackprop", "entropy", "budget_or_none",
           "mean_keep", "BudgetExceeded"]

SKIP_BELOW = 1e-3  # keep ratios below this train nothing; see NOTE [Empty layers]
TRANSIENT_STEPS = 16  # steps at one micro-batch size whose largest transient the plan takes
PEAK_MARGIN = 1.1     # transients vary a little from step to step (augmentation draws)
MOST_MARGIN = 2.0     # the widest swing between readings the margin follows
PRIOR_FACTOR = 2.0    # an unmeasured step's bound: this many times its modules' outputs
MB = 2 ** 20

ForwardLoss = Callable[[nn.Module, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the sparse-backprop engine.

    Attributes:
        policy: how saved tensors are stored (see CapturePolicy).
        variant: ``paper`` (min-max normalised importance) or ``published`` (raw G * M).
        keep_floor: smallest keep ratio of a trained layer.
        budget_bytes: cap on the measured cache; ``None`` uses the importance ratios as they are.
        probe_every: 0 (default, the paper's rule): gradient importance comes from the latest
            step's own gradients, after one dense probe at the first step. N > 0: a dense probe
            on ``probe_samples`` random samples every N steps, as the published code does (N = 1).
        probe_samples: samples in the probe.
        fixed_keep: one keep ratio for every trained layer instead of importance (the
            static-sparsity baseline); no probe runs.
        peak_budget_bytes: cap on the step's measured peak (NOTE [Peak budget]); ``None``
            bounds only the cache.
        min_chunk: the smallest micro-batch a step is split into to fit a budget.
    """

    policy: CapturePolicy = field(default_factory=CapturePolicy)
    variant: str = "paper"
    keep_floor: float = 0.0
    budget_bytes: Optional[int] = None
    probe_every: int = 0
    probe_samples: int = 10
    fixed_keep: Optional[float] = None
    peak_budget_bytes: Optional[int] = None
    min_chunk: int = 8

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError("variant must be one of %s, got %r" % (VARIANTS, self.variant))
        check_keep_ratio("keep_floor", self.keep_floor)
        if self.fixed_keep is not None:
            check_keep_ratio("fixed_keep", self.fixed_keep)
        if self.budget_bytes is not None and not self.budget_bytes > 0:
            raise ValueError("budget_bytes must be > 0 or None, got %r" % (self.budget_bytes,))
        if self.peak_budget_bytes is not None and not self.peak_budget_bytes > 0:
            raise ValueError("peak_budget_bytes must be > 0 or None, got %r"
                             % (self.peak_budget_bytes,))
        if self.min_chunk < 1:
            raise ValueError("min_chunk must be >= 1, got %r" % (self.min_chunk,))
        if self.probe_every < 0 or self.probe_samples < 1:
            raise ValueError("probe_every must be >= 0 and probe_samples >= 1, got %d and %d"
                             % (self.probe_every, self.probe_samples))


@dataclass
class StepReport:
    """What one step cost and did. Bytes are measured unless named ``predicted``/``paper``."""

    loss: float
    logits: torch.Tensor
    cache_bytes: int
    paper_bytes: int
    predicted_bytes: int
    keep_ratios: Dict[str, float]
    layers: Dict[str, LayerCache]
    seconds: float
    skipped: bool = False
    trained_layers: int = 0   # prunable layers that kept enough to train; 0 = budget starved
    overall_keep: Optional[float] = None   # kept / prunable values over trainable layers
    kinds: Dict[Tuple[str, str], int] = field(default_factory=dict)   # bytes per (kind, role)
    chunks: int = 1                       # micro-batches the step ran in (NOTE [Peak budget])
    peak_bytes: Optional[int] = None      # under a peak budget, NOTE [Step peak]; else None


@dataclass
class _Run:
    """What the micro-batches of one step gave."""

    loss: Union[float, torch.Tensor] = 0.0   # a tensor until read (``_run_chunks(read=False)``)
    cache: int = 0
    layers: Optional[Dict[str, LayerCache]] = None
    kinds: Dict[Tuple[str, str], int] = field(default_factory=dict)
    skipped: bool = False
    backward: bool = False
    outputs: List[torch.Tensor] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None


def chunk_counts(batch: int, min_chunk: int) -> List[int]:
    """Micro-batch counts to try, fewest first: 1, 2, 4, ... while chunks keep ``min_chunk``."""
    counts = [1]
    while -(-batch // (counts[-1] * 2)) >= min_chunk and counts[-1] * 2 <= batch:
        counts.append(counts[-1] * 2)
    return counts


class SparseBackprop:
    """Plans keep ratios, captures one forward, measures its cache, runs backward.

    Args:
        model: the model being adapted (its trainable parameters decide which layers prune).
        config: EngineConfig.
    """

    def __init__(self, model: nn.Module, config: Optional[EngineConfig] = None):
        self.model = model
        self.config = config or EngineConfig()
        self.capture = ActivationCapture(model, self.config.policy)
        self.budget_bytes = self.config.budget_bytes
        self.peak_budget_bytes = self.config.peak_budget_bytes
        self._transients: Dict[int, Deque[int]] = {}   # micro-batch size -> bytes above cache
        self._probe_peaks: Deque[float] = collections.deque(maxlen=TRANSIENT_STEPS)  # per sample
        self._outputs_per_sample: Optional[float] = None   # bytes every module's output took
        self._peak_measurable = True   # until a step's meter says otherwise
        self._numel: Dict[str, float] = {}   # per-sample activation size of every prunable layer
        self._grad_imp: Dict[str, float] = {}
        self._fixed: Optional[Tuple[int, float]] = None   # (batch, fixed bytes per sample)
        self.steps = 0

    def forget(self) -> None:
        """Drop learnt importance and sizes (after a model reset); the next step probes again."""
        self._numel, self._grad_imp, self._fixed = {}, {}, None
        self._transients.clear()
        self._probe_peaks.clear()
        self.steps = 0

    def set_budget(self, budget_bytes: Optional[int]) -> None:
        """Change the cache budget from the next step on (``None`` removes it)."""
        if budget_bytes is not None and not budget_bytes > 0:
            raise ValueError("budget must be > 0 bytes or None, got %r" % (budget_bytes,))
        self.budget_bytes = budget_bytes

    def base_ratios(self) -> Dict[str, float]:
        """Keep ratios from the latest importance; frozen layers keep nothing."""
        if self.config.fixed_keep is not None:
            ratios = {n: self.config.fixed_keep for n in self._numel}
        else:
            ratios = keep_ratios(self._grad_imp, memory_importance(self._numel),
                                 self.config.variant, self.config.keep_floor)
        trained = weights_needing_grad(self.capture.weight_of, self._numel)
        return {n: (ratios.get(n, 1.0) if trained[n] else 0.0) for n in self._numel}

    def set_peak_budget(self, budget_bytes: Optional[int]) -> None:
        """Change the cap on the step's peak from the next step on (``None`` removes it)."""
        if budget_bytes is not None and not budget_bytes > 0:
            raise ValueError("peak budget must be > 0 bytes or None, got %r" % (budget_bytes,))
        self.peak_budget_bytes = budget_bytes

    @property
    def peak_bounded(self) -> bool:
        """A peak budget is set and the peak can be measured here (NOTE [Step peak]: not on a
        CPU whose allocator keeps what it frees): otherwise only the cache is bounded."""
        return self.peak_budget_bytes is not None and self._peak_measurable

    def transient_for(self, size: int) -> Optional[float]:
        """Bytes a micro-batch of ``size`` is expected to need above its cache (NOTE [Peak
        budget]); None before any step was measured."""
        seen = {n: max(values) for n, values in self._transients.items()}
        if not seen:
            return None
        if size in seen:
            return float(seen[size])
        above = [n for n in seen if n > size]
        if above:
            return float(seen[min(above)])   # a smaller part never needs more
        return size * max(bytes_ / n for n, bytes_ in seen.items())

    def plan(self, x: torch.Tensor, forward_loss: ForwardLoss) -> Tuple[BudgetPlan, int]:
        """Ratios and the number of micro-batches for a step on ``x`` (NOTE [Peak budget]).

        Raises:
            BudgetExceeded: not even chunks of ``min_chunk`` samples at the keep floor fit.
        """
        base = self.base_ratios()
        batch = x.shape[0]
        if self.budget_bytes is None and not self.peak_bounded:
            return BudgetPlan(base, -1, 1.0), 1
        if self._fixed is None or self._fixed[0] != batch:
            self._profile_on(x[: min(2, batch)], forward_loss, batch)
        policy = self.config.policy
        profile = CacheProfile(self._fixed[1], dict(self._numel), self._value_bytes(),
                               policy.sync_free_on(x.device), policy.selection)
        counts = chunk_counts(batch, self.config.min_chunk)
        if self.peak_bounded:   # parts at most twice the largest measured twice (its swing known)
            largest = max((n for n, seen in self._transients.items() if len(seen) > 1), default=0)
            counts = [n for n in counts if -(-batch // n) <= 2 * largest
                      or self._fitting_bound(-(-batch // n)) is not None] or counts[-1:]
        trains = any(keep >= SKIP_BELOW for keep in base.values())
        failure = None
        for chunks in counts:
            size = -(-batch // chunks)
            budget = self._cache_budget(size)
            try:
                plan = solve_budget(profile, base, budget, size, self.config.keep_floor)
            except (BudgetExceeded, ValueError) as exc:
                failure = exc
                continue
            if not trains or any(k >= SKIP_BELOW for k in plan.keep_ratios.values()):
                return plan, chunks
        raise BudgetExceeded(self.peak_budget_bytes or self.budget_bytes or 0,
                             int(getattr(failure, "floor_bytes", 0)), self._no_fit(batch))

    def margin(self) -> float:
        """What a measured transient is multiplied by: ``PEAK_MARGIN``, or the widest swing
        seen between readings at one size where that is larger (up to ``MOST_MARGIN``)."""
        readings = [values for values in self._transients.values() if len(values) > 1]
        if len(self._probe_peaks) > 1:
            readings.append(self._probe_peaks)
        swings = [max(values) / min(values) for values in readings if min(values) > 0]
        return min(MOST_MARGIN, max([PEAK_MARGIN] + swings))

    def _cache_budget(self, size: int) -> int:
        """What the cache may take in a chunk of ``size``: the cache budget and the peak budget
        less the chunk's measured transients, whichever is smaller (<= 0: nothing fits)."""
        budgets = [] if self.budget_bytes is None else [self.budget_bytes]
        if self.peak_bounded:
            transient = self.transient_for(size)
            if transient is not None:
                budgets.append(int(self.peak_budget_bytes - self.margin() * transient))
            else:   # nothing measured: the bound where it fits (else the smallest parts run)
                budgets.append(int(self.peak_budget_bytes - (self._fitting_bound(size) or 0.0)))
        return min(budgets)

    def bound_for(self, size: int) -> Optional[float]:
        """A bound on a part of ``size``'s transients that needs no step measured:
        ``PRIOR_FACTOR`` times the bytes every module's output took in the loss's forwards
        (NOTE [Peak budget]); None before the first plan."""
        if self._outputs_per_sample is None:
            return None
        return PRIOR_FACTOR * self._outputs_per_sample * size

    def _fitting_bound(self, size: int) -> Optional[float]:
        """``bound_for(size)`` where it fits the peak budget, else None."""
        bound = self.bound_for(size)
        return bound if bound is not None and bound <= self.peak_budget_bytes else None

    def _no_fit(self, batch: int) -> str:
        chunk = min(batch, self.config.min_chunk)
        parts = ["the step does not fit at batch %d even in chunks of %d with every keep ratio "
                 "at its floor" % (batch, chunk)]
        if self.budget_bytes is not None:
            parts.append("cache budget %.2f MB" % (self.budget_bytes / MB))
        if self.peak_bounded:
            parts.append("peak budget %.2f MB, of which the forward's transients take about "
                         "%.2f MB per chunk" % (self.peak_budget_bytes / MB,
                                                (self.transient_for(chunk) or 0) / MB))
        return "; ".join(parts) + ": shrink the batch or raise the budget"

    def step(self, x: torch.Tensor, forward_loss: ForwardLoss) -> StepReport:
        """Forward under capture, measure the cache, backward (if the loss is finite).

        ``forward_loss(model, x)`` returns ``(loss, logits)``; gradients land in ``.grad``. Under
        a budget the batch may run as micro-batches whose gradients add up (NOTE [Peak budget]).
        """
        start = time.perf_counter()
        probed = self._wants_probe()
        if probed:
            self._metered_probe(x)
        elif not self._numel and self.steps == 0:   # static ratios still need the layer list
            self._learn_sizes_from(x)
        plan, chunks = self.plan(x, forward_loss)
        trained = [n for n, keep in plan.keep_ratios.items() if keep >= SKIP_BELOW]
        # only a peak budget needs the engine's own meter: Method.step meters the whole step
        metered = self.peak_budget_bytes is not None
        meter = PeakMeter(x.device) if metered else contextlib.nullcontext()
        with meter, self._skip_empty_layers(plan.keep_ratios):
            run = self._run_chunks(x.tensor_split(chunks), plan.keep_ratios, forward_loss)
            if not run.skipped and not probed and run.backward:
                # the paper's rule: importance from the latest gradients
                self._grad_imp.update(gradient_importance(self.capture.weight_of, trained))
        size = -(-x.shape[0] // chunks)
        peak = meter.peak_bytes if metered else None
        if metered:
            self._peak_measurable = peak is not None
        if peak is not None and self.steps > 0:   # the first one warms up too
            self._transients.setdefault(size, collections.deque(maxlen=TRANSIENT_STEPS)).append(
                max(0, peak - run.cache))
        self._observe(run.layers, run.cache, size, x.shape[0])
        self.steps += 1
        return StepReport(run.loss, run.logits, run.cache, paper_bytes(run.layers),
                          plan.predicted_bytes, plan.keep_ratios, run.layers,
                          time.perf_counter() - start, run.skipped, len(trained),
                          self.overall_keep(plan.keep_ratios), run.kinds, chunks, peak)

    def _wants_probe(self) -> bool:
        """A dense probe is due: importance is missing or the periodic probe is due, and some
        trained layer prunes. Without one (1-bit x_hat, where the trained norms keep codes and
        the frozen convs keep nothing) no ratio reads importance, and each step paid a dense
        forward and backward on a few samples and a copy of every buffer for nothing."""
        if self.config.fixed_keep is not None:
            return False
        if self.steps > 0 and not any(weights_needing_grad(self.capture.weight_of,
                                                           self._numel).values()):
            return False
        every = self.config.probe_every
        return not self._grad_imp or (every > 0 and self.steps % every == 0)

    def static_ratios(self, x: torch.Tensor, forward_loss: ForwardLoss
                      ) -> Optional[Dict[str, float]]:
        """Keep ratios no later step changes, for a step captured once and replayed (NOTE
        [Captured step] in capturable.py): one fixed ratio, or no pruned layer trains (the
        daemon's 1-bit x_hat recipe). None where importance moves them, or where the budgets
        split the step into parts (the plan is made anew before every step: a budget that
        changes the ratios brings a new capture)."""
        if self.steps == 0 or self._wants_probe():
            return None
        trains = any(weights_needing_grad(self.capture.weight_of, self._numel).values())
        if trains and self.config.fixed_keep is None:
            return None
        plan, chunks = self.plan(x, forward_loss)
        return plan.keep_ratios if chunks == 1 else None

    def run_unread(self, x: torch.Tensor, forward_loss: ForwardLoss,
                   ratios: Dict[str, float]) -> "_Run":
        """Forward and backward at ``ratios`` with nothing read on the host (NOTE [Captured
        step]): ``run.loss`` stays a tensor and a non-finite one is the caller's to catch."""
        with self._skip_empty_layers(ratios):
            return self._run_chunks([x], ratios, forward_loss, read=False)

    def _run_chunks(self, parts, ratios: Dict[str, float], forward_loss: ForwardLoss,
                    read: bool = True) -> "_Run":
        """Forward and backward each part in turn; the cache reported is the largest part's
        (one part's graph is alive at a time). A non-finite loss in any part discards the
        gradients of all: no half-accumulated update. ``read=False`` leaves the loss a tensor.

        NOTE [One read a step]
        The loss is read on the host once, after every part's backward is queued: each read
        before that would make a GPU finish the forward before the host could queue the
        backward's first kernel, idling it for a launch round trip per read. A non-finite loss
        therefore runs its backward too (into gradients that are then discarded); it is rare,
        and it costs no more than a finite one.
        """
        total = sum(part.shape[0] for part in parts)
        run = _Run()
        losses = []
        for part in parts:
            with self.capture.record(ratios) as rec:
                loss, logits = forward_loss(self.model, part)
            cache = rec.cache_bytes()
            if cache >= run.cache or run.layers is None:
                run.cache, run.layers, run.kinds = cache, rec.layers(), rec.bytes_by_kind()
            share = part.shape[0] / total
            # backward is queued without reading the loss first: on a GPU a host read here
            # would drain the queue between forward and backward (NOTE [One read a step])
            if loss.requires_grad:
                (loss * share).backward() if share < 1 else loss.backward()
                run.backward = True
            losses.append(loss.detach() * share if share < 1 else loss.detach())
            run.outputs.append(logits.detach())
            del loss, logits
        run.loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        run.logits = run.outputs[0] if len(run.outputs) == 1 else torch.cat(run.outputs)
        run.outputs = []
        if not read:
            return run
        run.loss = float(run.loss)
        run.skipped = not math.isfinite(run.loss)   # any part's NaN or inf reaches the sum
        if run.skipped:
            self.model.zero_grad(set_to_none=True)
        return run

    def overall_keep(self, ratios: Dict[str, float]) -> Optional[float]:
        """Kept values over prunable values of the layers that train (the paper's sparsity)."""
        trainable = weights_needing_grad(self.capture.weight_of, self._numel)
        sizes = {n: v for n, v in self._numel.items() if trainable[n] and n in ratios}
        total = sum(sizes.values())
        return sum(ratios[n] * v for n, v in sizes.items()) / total if total else None

    @contextlib.contextmanager
    def _skip_empty_layers(self, ratios: Dict[str, float]):
        """Freeze, for one step, the weights of layers that keep (almost) nothing.

        NOTE [Empty layers]
        A layer whose keep ratio is below SKIP_BELOW would get a weight gradient from (nearly) all
        zeros. Freezing its weight for the step means autograd saves nothing for it and backward
        skips its weight gradient: less memory and less time, and its optimizer state is not
        moved by a meaningless zero gradient. The probe still scores it densely.
        """
        frozen = []
        for name, keep in ratios.items():
            weight = self.capture.weight_of(name)
            if keep < SKIP_BELOW and weight is not None and weight.requires_grad:
                weight.requires_grad_(False)
                frozen.append(weight)
        try:
            yield
        finally:
            for weight in frozen:
                weight.requires_grad_(True)

    def probe(self, x: torch.Tensor, count: Optional[int] = None) -> None:
        """Dense entropy backward on ``count`` random samples (default ``probe_samples``) to
        refresh gradient importance.

        Gradients are zeroed before and after (the published code lets the previous step's
        gradient leak into the probe) and norm statistics are restored afterwards, so the probe
        changes nothing but the importance scores.
        """
        count = count or self.config.probe_samples
        samples = x[torch.randperm(x.shape[0], device=x.device)[:count]]
        self.model.zero_grad(set_to_none=True)
        with statistics_kept(self.model):
            with self.capture.record({}, passthrough=True) as rec:
                loss = entropy(self.model(samples)).mean()
            self._learn_sizes(rec.layers(), samples.shape[0])
            if math.isfinite(float(loss.detach())) and loss.requires_grad:
                loss.backward()
                self._grad_imp = gradient_importance(self.capture.weight_of, self._numel)
            self.model.zero_grad(set_to_none=True)

    def probe_count(self, batch: int) -> int:
        """Samples the next probe takes: under a peak budget, as many as its measured cost per
        sample leaves room for; until that is measured, all of them where the bound that needs
        no measurement fits, else 2 (NOTE [Peak budget]).

        Raises:
            BudgetExceeded: even one sample's probe does not fit the peak budget.
        """
        count = min(self.config.probe_samples, batch)
        if not self.peak_bounded:
            return count
        if not self._probe_peaks:
            return count if self._fitting_bound(count) is not None else min(count, 2)
        per_sample = self.margin() * max(self._probe_peaks)
        if per_sample > self.peak_budget_bytes:
            raise BudgetExceeded(self.peak_budget_bytes, int(per_sample), (
                "the importance probe needs about %.2f MB on one sample but the peak budget is "
                "%.2f MB: raise the budget" % (per_sample / MB, self.peak_budget_bytes / MB)))
        return min(count, int(self.peak_budget_bytes // per_sample))

    def _metered_probe(self, x: torch.Tensor) -> None:
        """The probe, sized and metered under a peak budget: its graph is gone before the
        step's forward starts, so it must fit the budget on its own."""
        count = self.probe_count(x.shape[0])
        if self.peak_budget_bytes is None:
            self.probe(x, count)
            return
        with PeakMeter(x.device) as meter:
            self.probe(x, count)
        if meter.peak_bytes is not None:
            self._probe_peaks.append(meter.peak_bytes / count)

    def _learn_sizes_from(self, x: torch.Tensor) -> None:
        with statistics_kept(self.model):
            with self.capture.record({}, passthrough=True) as rec:
                out = self.model(x[: min(2, x.shape[0])])   # held: its graph is what is measured
                self._learn_sizes(rec.layers(), min(2, x.shape[0]))
            del out

    def _profile_on(self, x: torch.Tensor, forward_loss: ForwardLoss, batch: int) -> None:
        """Measure the fixed (non-prunable) cache per sample on a slice, without side effects."""
        with statistics_kept(self.model), _output_bytes(self.model) as outputs:
            with self.capture.record({}) as rec:
                held = forward_loss(self.model, x)   # the graph lives only while its outputs do
                layers, cache = rec.layers(), rec.cache_bytes()
            del held
        self._outputs_per_sample = outputs[0] / x.shape[0]
        self._learn_sizes(layers, x.shape[0])
        self._fixed = (batch, CacheProfile.fixed_bytes_per_sample(layers, cache, x.shape[0]))

    def _observe(self, layers: Dict[str, LayerCache], cache: int, size: int, batch: int) -> None:
        """Learn per-sample sizes from a part of ``size`` samples of a batch of ``batch``."""
        self._learn_sizes(layers, size)
        self._fixed = (batch, CacheProfile.fixed_bytes_per_sample(layers, cache, size))

    def _learn_sizes(self, layers: Dict[str, LayerCache], batch: int) -> None:
        # layers skipped this step are absent from the record; keep what was learnt of them
        self._numel.update({n: v / batch for n, v in prunable_sizes(layers).items()})

    def _value_bytes(self) -> int:
        return 4 if self.config.policy.value_dtype == "fp32" else 2


@contextlib.contextmanager
def _output_bytes(model: nn.Module):
    """``[bytes]``: what the tensors every leaf module returned took, while inside."""
    total = [0]

    def count(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total[0] += sum(t.numel() * t.element_size() for t in outputs
                        if isinstance(t, torch.Tensor))

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if next(m.children(), None) is None]
    try:
        yield total
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def statistics_kept(model: nn.Module):
    """Forwards inside leave no trace: buffers (running statistics) and shift gates restored."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    gates = {id(g): (g, g.state()) for g in shift_gates(model)}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in buffers:
                    buf.copy_(buffers[name])
        for gate, state in gates.values():
            gate.load_state(state)


def mean_keep(ratios: Dict[str, float]) -> Optional[float]:
    """The mean keep ratio of the layers that train (ratio above 0); None where none does."""
    trained = [k for k in ratios.values() if k > 0]
    return sum(trained) / len(trained) if trained else None


def budget_or_none(megabytes: Optional[float]) -> Optional[int]:
    """MB (2**20 bytes) to bytes, keeping ``None``; rejects non-positive budgets."""
    if megabytes is None:
        return None
    if not megabytes > 0:
        raise ValueError("budget must be > 0 MB, got %r" % (megabytes,))
    return int(megabytes * 2**20)

