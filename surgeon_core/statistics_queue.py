"""The lean norms' running-statistics updates, batched over a model's norms.

NOTE [Batched statistics updates]
Each lean norm moves its running statistics towards every training batch's by MECTA's forget
gate, ``rate = 1 - exp(-scale * KL)``, with guards for a non-finite batch. Done per norm, that
is about 25 operators on vectors of a few dozen channels: ResNet-20's 19 norms spent more
operators on it than on their convolutions, and a GPU launches each one (issue 15). Nothing in
a forward reads a norm's running statistics after that norm has run, except the same norm
running again, so the updates wait in the model's queue and run together when the forward
ends (a forward hook on the model), in about 30 operators whatever the number of norms:

    the batches' means and inverse deviations and the running statistics, concatenated;
    per channel the symmetric KL's terms; per norm their mean, read from a zero-padded
    (norms, widest) table filled by one ``index_copy_``;
    per norm the rate: its own gate's, a fixed momentum, or one given by the caller (the
    deep norms' shared rate, NOTE [Split statistics]); 0 where the KL is not finite;
    ``_foreach_lerp_`` of the running means and variances, the batch's non-finite values
    zeroed first so that a rate of 0 leaves the running value exactly as it was.

The queue also computes the norms' backward constants that wait (NOTE [Deferred backward
constants] in backward_constants.py). It runs when a norm is about to run a second time in one
forward, when a deep norm asks the shift gate for its rate (the shallow norms' KLs are the
gate's input), and before a norm's state is saved, loaded, or used in evaluation. A norm in no
model's queue runs its own at once.
"""

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .backward_constants import BackwardConstants, compute_all

KL_EPS = 1e-3   # added to both variances in the KL, as MECTA does


def no_torch_function():
    """A context in which no __torch_function__ mode or override runs (torch >= 2.0)."""
    disable = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


def symmetric_kl_terms(batch_mean: torch.Tensor, batch_var: torch.Tensor,
                       run_mean: torch.Tensor, run_var: torch.Tensor,
                       eps: float = KL_EPS) -> torch.Tensor:
    """Per channel, twice the symmetric KL between two Gaussians plus 2: its mean over the
    channels, halved, less 1, is the mean symmetric KL."""
    batch_var, run_var = batch_var + eps, run_var + eps
    delta2 = (batch_mean - run_mean).square()
    return torch.addcdiv((batch_var + delta2) / run_var, run_var + delta2, batch_var)


class _Layout:
    """The constants of one sequence of norms: where each one's channels lie."""

    def __init__(self, norms: Tuple[nn.Module, ...], like: torch.Tensor):
        device, dtype = like.device, like.dtype
        counts = [m.num_features for m in norms]
        widest = max(counts)
        self.counts = counts
        self.segment = torch.repeat_interleave(torch.arange(len(norms), device=device),
                                               torch.tensor(counts, device=device))
        self.slots = torch.tensor([i * widest + c for i, n in enumerate(counts)
                                   for c in range(n)], device=device)
        self.table = (len(norms), widest)
        self.half_mean = torch.tensor([0.5 / n for n in counts], device=device, dtype=dtype)
        self.zero = torch.zeros((), device=device, dtype=dtype)
        self.eps = torch.cat([torch.full((n,), m.eps, device=device, dtype=dtype)
                              for m, n in zip(norms, counts)])
        scales = [m.gate_scale for m in norms]
        self.neg_scales = torch.tensor([-(s or 0.0) for s in scales], device=device, dtype=dtype)
        self.momenta = self.fixed = None
        if any(s is None for s in scales):
            self.fixed = torch.tensor([s is None for s in scales], device=device)
            self.momenta = torch.tensor([m.momentum for m in norms], device=device, dtype=dtype)
        self.gates = _reporters(norms, device)


def _reporters(norms, device) -> List[Tuple[object, Optional[torch.Tensor]]]:
    """Each shift gate the shallow norms among ``norms`` report to, with their positions
    (None: all of them)."""
    positions: Dict[int, List[int]] = {}
    gates = {}
    for i, m in enumerate(norms):
        if getattr(m, "gate_role", "") == "shallow":
            positions.setdefault(id(m.shift_gate), []).append(i)
            gates[id(m.shift_gate)] = m.shift_gate
    return [(gates[key], None if len(where) == len(norms) else torch.tensor(where, device=device))
            for key, where in positions.items()]


class StatisticsQueue:
    """Running-statistics updates waiting for the end of a forward (NOTE [Batched statistics
    updates]). Called as a forward hook, it runs them."""

    def __init__(self):
        self._clear()
        self._layouts: Dict[tuple, _Layout] = {}

    def _clear(self) -> None:
        self._norms: List[nn.Module] = []
        self._means: List[torch.Tensor] = []
        self._invstds: List[torch.Tensor] = []
        self._given: List[Optional[torch.Tensor]] = []
        self._constants: List[BackwardConstants] = []

    def __call__(self, module, inputs, output) -> None:
        self.flush()

    def __getstate__(self):
        return {}   # nothing waits between forwards, and layouts are rebuilt on demand

    def __setstate__(self, state) -> None:
        self.__init__()

    def __deepcopy__(self, memo):
        copy = StatisticsQueue()   # a copy starts empty: the original's wait for its norms
        memo[id(self)] = copy
        return copy

    def holds(self, norm: nn.Module) -> bool:
        return any(m is norm for m in self._norms)

    def add(self, norm: nn.Module, mean: torch.Tensor, invstd: torch.Tensor,
            rate: Optional[torch.Tensor] = None) -> None:
        """Queue ``norm``'s update from a batch's ``mean`` and ``invstd`` (as
        ``native_batch_norm`` returns them); ``rate``: the caller's, else the norm's own."""
        self._norms.append(norm)
        self._means.append(mean)
        self._invstds.append(invstd)
        self._given.append(rate)

    def defer(self, constants: BackwardConstants) -> BackwardConstants:
        """Compute ``constants`` with the others at the next flush."""
        self._constants.append(constants)
        return constants

    def flush(self) -> None:
        norms, means, invstds, given = self._norms, self._means, self._invstds, self._given
        constants = self._constants
        self._clear()
        with torch.no_grad(), no_torch_function():
            compute_all(constants)   # first: some read running statistics the update moves
            if norms:
                _update(norms, means, invstds, given, self._layout(norms, means[0]))

    def _layout(self, norms: List[nn.Module], like: torch.Tensor) -> _Layout:
        # what a layout depends on may be set after conversion (roles, momentum)
        key = (tuple((id(m), m.num_features, m.eps, m.gate_scale, m.momentum,
                      getattr(m, "gate_role", ""), id(getattr(m, "shift_gate", None)))
                     for m in norms), like.device, like.dtype)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= 16:   # a model whose forwards vary: keep the latest
                self._layouts.clear()
            layout = self._layouts[key] = _Layout(tuple(norms), like)
        return layout


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _update(norms, means, invstds, given, layout: _Layout) -> None:
    mean, invstd = _cat(means), _cat(invstds)
    run_mean = _cat([m.running_mean for m in norms])
    run_var = _cat([m.running_var for m in norms])
    var = (invstd.pow(-2) - layout.eps).clamp_(min=0.0)
    kl = _mean_kl(symmetric_kl_terms(mean, var, run_mean, run_var), layout)
    finite = (kl - kl) == 0      # the running statistics are finite: the batch's decide
    rate = torch.expm1(kl * layout.neg_scales).neg_()
    if layout.fixed is not None:
        rate = torch.where(layout.fixed, layout.momenta, rate)
    if any(g is not None for g in given):
        rate = _with_given(rate, given)
    rate = torch.where(finite, rate, layout.zero)
    held = run_mean.dtype     # the kernel's statistics are fp32 even for fp16 buffers
    per_channel = rate.index_select(0, layout.segment).to(held).split(layout.counts)
    # zeroed, a non-finite batch value times a rate of 0 leaves the running value as it was
    mean = torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0).to(held).split(layout.counts)
    var = torch.nan_to_num(var, nan=0.0, posinf=0.0, neginf=0.0).to(held).split(layout.counts)
    torch._foreach_lerp_([m.running_mean for m in norms], list(mean), list(per_channel))
    torch._foreach_lerp_([m.running_var for m in norms], list(var), list(per_channel))
    for index, norm in enumerate(norms):
        norm._last_rate = (rate[index], finite[index])
    for gate, where in layout.gates:
        gate.report(kl if where is None else kl.index_select(0, where))


def _mean_kl(terms: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Each norm's mean symmetric KL from the per-channel terms, through a zero-padded
    (norms, widest) table: one deterministic copy and a row sum."""
    table = terms.new_zeros(layout.table[0] * layout.table[1])
    table.index_copy_(0, layout.slots, terms)
    return table.view(layout.table).sum(1).mul_(layout.half_mean).sub_(1.0)


def _with_given(rate: torch.Tensor, given: List[Optional[torch.Tensor]]) -> torch.Tensor:
    """The callers' rates where given (in practice one shared tensor: the deep norms')."""
    shared = {id(g): g for g in given if g is not None}
    if len(shared) == 1 and all(g is not None for g in given):
        return next(iter(shared.values())).expand_as(rate)
    return torch.stack([rate[i] if g is None else g for i, g in enumerate(given)])


def install(model: nn.Module, norms: List[nn.Module]) -> Optional[StatisticsQueue]:
    """One queue for ``model``'s lean ``norms``, run after each forward of ``model``; it
    replaces a queue installed on ``model`` before."""
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(hook, StatisticsQueue):
            hook.flush()
            del model._forward_hooks[key]
    if not norms:
        return None
    queue = StatisticsQueue()
    for norm in norms:
        if norm.statistics_queue is not None:
            norm.statistics_queue.flush()
        norm.statistics_queue = queue
    model.register_forward_hook(queue)
    return queue
