"""Surgeon's step with nothing read on the host, captured once as a CUDA graph and replayed.

NOTE [Captured step]
On a GPU the sparse step is launch-bound: a thousand-odd small kernels (packing, unpacking, the
lean norms' statistics), each a round trip through a Jetson's slow cores (an H100 measured the
step at 5-6.6x full backprop's). A CUDA graph records the kernels once and replays them all in
one launch. A replay repeats kernels, not Python, so the step it captures must:
- read nothing on the host: the loss, the finiteness check, the CSS count and Adam's step
  count stay on the device (``HOST_READS`` in opcount.py names what would read);
- write every state where the capture found it: parameters, Adam's moments and step counts,
  running statistics and the shift gate's count all change in place;
- keep its shapes and keep ratios (``SparseBackprop.static_ratios``: the 1-bit and 2-bit x_hat
  recipes and fixed ratios, in one part; ratios driven by importance change every step, and
  a step in micro-batches is planned from measured peaks: those run eagerly);
- draw its randomness on the device (NOTE [Drawn on the device] in augment.py). The jitters'
  order is drawn at capture and again every ``RECAPTURE_EVERY`` replays.
The update is ``torch.optim.Adam``'s (its defaults: no weight decay, amsgrad or maximize) in
foreach operators on the optimizer's own state, so that checkpoints and eager steps read it
unchanged (``masked_adam``). Every state moves by a weight that is 0 when the loss or a
gradient is not finite, so such a step changes nothing without a host read; the gradients are
cleaned first, so that no 0 * NaN arises. The anchor's pull to the source is weighted alike.

``CapturedStep.key`` is checked before every replay: the input's shape, the options, the
ratios and the address of every tensor the graph reads or writes. A reset or a checkpoint that
replaces the optimizer's state, or a changed option, makes the next step capture anew. The
learning rate and the anchor's update count are written to the device before each replay:
``set_lr`` and checkpoint loads need no new capture. What the capture cannot take (a CPU, a
dynamic plan, an optimizer other than plain Adam, a failed capture) runs eagerly, and
``reason`` says why.
"""

import contextlib
import inspect
import logging
import random
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .capture import paper_bytes
from .engine import mean_keep
from .norm import shift_gates

__all__ = ["CapturedStep", "masked_adam", "RECAPTURE_EVERY"]

log = logging.getLogger(__name__)

RECAPTURE_EVERY = 200   # replays before the jitter order is redrawn by a new capture
SHORT_LIVED = 4           # a capture replaced after fewer replays than this was wasted,
SHORT_LIVED_IN_ROW = 3    # and this many in a row turn capturing off


class _Outputs(NamedTuple):
    """What one run of the step leaves on the device."""

    loss: torch.Tensor
    logits: torch.Tensor
    applied: torch.Tensor    # the update went in: finite, and something to learn from
    selected: torch.Tensor


def masked_adam(params: List[torch.Tensor], grads: List[torch.Tensor], states: List[dict],
                on: torch.Tensor, lr: torch.Tensor, betas: Tuple[float, float],
                eps: float) -> None:
    """``torch.optim.Adam``'s step (no weight decay, amsgrad or maximize) on its own state,
    weighted by ``on`` (a 0-dim tensor, 1 or 0): at 0 nothing moves. Every state tensor of one
    group advances together, so the first one's step count stands for all."""
    beta1, beta2 = betas
    count = len(params)
    grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, [on] * count)
    step = steps[0].clamp(min=1.0)   # a first step that was skipped must not divide by 0
    moments = [state["exp_avg"] for state in states]
    squares = [state["exp_avg_sq"] for state in states]
    torch._foreach_lerp_(moments, grads, [on * (1.0 - beta1)] * count)
    torch._foreach_lerp_(squares, torch._foreach_mul(grads, grads), [on * (1.0 - beta2)] * count)
    denominators = torch._foreach_sqrt(squares)
    torch._foreach_div_(denominators, [(1.0 - beta2 ** step).sqrt()] * count)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(moments, denominators)
    torch._foreach_mul_(updates, [on * lr / (1.0 - beta1 ** step)] * count)
    torch._foreach_sub_(params, updates)


class CapturedStep:
    """Runs a ``Surgeon`` method's step as a replayed CUDA graph (NOTE [Captured step]).

    ``step(x)`` returns the StepResult, or None where the step cannot be captured (then the
    method runs it eagerly, and ``reason`` says why). ``replay=False`` runs the capturable step
    eagerly instead: what a capture records, checkable on a CPU.
    """

    def __init__(self, method, replay: bool = True):
        self.method = method
        self.replay = replay
        self.reason: Optional[str] = None
        self.failed: Optional[str] = None   # a capture that raised: no more attempts
        self.captures = 0
        self.replays = 0    # since the latest capture
        self.replayed = 0   # in all
        self.pool_bytes = 0   # what the capture reserved: every replay's memory, held
        self._graph = None
        self._key = None
        self._static: Optional[torch.Tensor] = None
        self._outputs: Optional[_Outputs] = None
        self._scalars: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # lr, updates
        self._sources: Optional[List[torch.Tensor]] = None
        self._cache = (0, 0)
        self._short_lived = 0   # captures in a row replaced before SHORT_LIVED replays
        self._rng = random.Random(method.args.seed)
        self.guard = contextlib.nullcontext   # what a capture holds: the daemon's serving lock

    def summary(self) -> Dict[str, object]:
        """For telemetry: captures, replays, and why the latest step ran eagerly (or None)."""
        return {"captures": self.captures, "replays": self.replayed,
                "eager_because": self.failed or self.reason}

    def drop(self) -> None:
        """Forget the capture (its memory pool goes with it); the next step captures anew."""
        self._graph, self._key, self._outputs, self._static = None, None, None, None
        self._sources = self._scalars = None

    def step(self, x: torch.Tensor):
        ratios = self._ratios(x)
        if ratios is None:
            self.drop()
            return None
        self._prepare(x)
        if not self.replay:
            return self._result(self._run(x, ratios), ratios)
        if self._graph is None or self.key(x, ratios) != self._key \
                or self.replays >= RECAPTURE_EVERY:
            return None if self._captures_wasted() else self._capture(x, ratios)
        self._static.copy_(x)
        self._write_scalars()
        self._graph.replay()
        self.replays += 1
        self.replayed += 1
        result = self._result(self._outputs, ratios)
        # a replay allocates nothing: what it holds at its peak is the graph's pool, for good
        result.peak_bytes = result.reserved_bytes = self.pool_bytes
        return result

    def _captures_wasted(self) -> bool:
        """A new capture is due: count the one it replaces if that one barely replayed, and
        turn capturing off after ``SHORT_LIVED_IN_ROW`` such in a row (each costs a step)."""
        replaced_early = self._graph is not None and self.replays < SHORT_LIVED
        self._short_lived = self._short_lived + 1 if replaced_early else 0
        if self._short_lived < SHORT_LIVED_IN_ROW:
            return False
        self._turn_off("the step changed before %d replays %d times in a row"
                       % (SHORT_LIVED, SHORT_LIVED_IN_ROW))
        return True

    def why_not(self, x: torch.Tensor) -> Optional[str]:
        """Why a step on ``x`` cannot be captured; None where it can (the plan aside)."""
        method = self.method
        if self.failed:
            return "the capture failed: %s" % self.failed
        if self.replay and x.device.type != "cuda":
            return "not a CUDA device"
        optimizer = method.optimizer
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
            return "the optimizer is not one group of plain Adam"
        group = optimizer.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            return "Adam with weight decay, amsgrad or maximize"
        params = group["params"]
        if any(p.device != x.device or p.dtype != params[0].dtype for p in params):
            return "parameters on another device or of mixed types"
        if any(p not in optimizer.state or "exp_avg" not in optimizer.state[p] for p in params):
            return "Adam has no state yet (the first eager steps make it)"
        return None

    def key(self, x: torch.Tensor, ratios: Dict[str, float]) -> tuple:
        """What a capture depends on; any change asks for a new one."""
        method = self.method
        group = method.optimizer.param_groups[0]
        tensors = list(group["params"])
        for p in group["params"]:
            tensors.extend(method.optimizer.state[p].values())
        tensors.extend(method.model.buffers())
        tensors.extend(g.count for g in shift_gates(method.model) if g.count is not None)
        return (tuple(x.shape), x.dtype, x.device, method.args, method.engine.config,
                method.engine.budget_bytes, tuple(sorted(ratios.items())), group["betas"],
                group["eps"], tuple(t.data_ptr() for t in tensors if torch.is_tensor(t)))

    def _ratios(self, x: torch.Tensor) -> Optional[Dict[str, float]]:
        self.reason = self.why_not(x)
        if self.reason is not None:
            return None
        ratios = self.method.engine.static_ratios(x, self.method._forward_loss)
        if ratios is None:
            self.reason = ("keep ratios change from step to step (importance), or the "
                           "budgets split the step into parts")
        return ratios

    def _prepare(self, x: torch.Tensor) -> None:
        """Adam's step counts on the device, the scalars written before each run, the
        anchor's sources. (The group stays not ``capturable``: a checkpoint saved with that
        flag cannot step on a CPU. Its eager steps read device step counts one by one.)"""
        method = self.method
        params = method.optimizer.param_groups[0]["params"]
        self._move_steps(x.device)
        if self._scalars is None:
            self._scalars = tuple(torch.zeros((), device=x.device, dtype=params[0].dtype)
                                  for _ in range(2))
        if self._sources is None:
            source = method._source["model"]
            names = {p: n for n, p in method.model.named_parameters()}
            self._sources = [source[names[p]].to(p.device, p.dtype).clone() for p in params]

    def _turn_off(self, why: str) -> None:
        """No more captures: every later step runs eagerly, with Adam as it keeps itself."""
        self.failed = why
        log.warning("captured step off, steps run eagerly: %s", why)
        self.drop()
        self._move_steps(torch.device("cpu"))

    def _move_steps(self, device: torch.device) -> None:
        """Adam's step counts to ``device`` (a no-op where they are)."""
        optimizer = self.method.optimizer
        for p in optimizer.param_groups[0]["params"]:
            state = optimizer.state[p]
            state["step"] = state["step"].to(device, torch.float32)

    def _write_scalars(self) -> None:
        lr, updates = self._scalars
        lr.fill_(self.method.optimizer.param_groups[0]["lr"])
        updates.fill_(self.method.updates)

    def _capture(self, x: torch.Tensor, ratios: Dict[str, float]):
        """One eager run on a side stream (this batch's step), then the capture. ``guard``
        (the daemon's serving lock) keeps other threads' CUDA calls out of the capture, which
        torch 2.0 cannot confine to its own thread."""
        self._graph = self._outputs = None
        self._static = x.clone()
        order = _jitter_order(self._rng)
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device, priority=current.priority)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = self._result(self._run(self._static, ratios, order), ratios)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved(x.device)
        try:
            with self.guard(), torch.cuda.graph(graph, **_thread_local_capture()):
                self._outputs = self._run(self._static, ratios, order, scalars=False)
        except Exception as exc:   # an operator this model runs cannot be captured
            self.method.model.zero_grad(set_to_none=True)
            torch.cuda.synchronize(x.device)
            self._turn_off("%s: %s" % (type(exc).__name__, exc))
            return result
        self._graph, self._key = graph, self.key(x, ratios)
        self.pool_bytes = torch.cuda.memory_reserved(x.device) - reserved
        self.captures += 1
        self.replays = 0
        # replays allocate only from the graph's own pool: the eager steps' cached blocks
        # would double what the step holds on a box whose CPU and GPU share the memory
        torch.cuda.empty_cache()
        return result

    def _run(self, x: torch.Tensor, ratios: Dict[str, float],
             order: Optional[Tuple[int, ...]] = None, scalars: bool = True) -> _Outputs:
        """The step itself: forward, backward, masked Adam and anchor, nothing read."""
        method = self.method
        if scalars:
            self._write_scalars()
        method.model.zero_grad(set_to_none=True)
        method._selected = 0
        method._device_draws = order or _jitter_order()
        try:
            run = method.engine.run_unread(x, method._forward_loss, ratios)
        finally:
            method._device_draws = None
        self._cache = (run.cache, paper_bytes(run.layers))
        params = method.optimizer.param_groups[0]["params"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        applied = torch.isfinite(run.loss) & torch.isfinite(
            torch.stack(torch._foreach_norm(grads)).sum())
        selected = torch.as_tensor(method._selected, device=x.device)
        if not method.consistency_weight(run.logits) > 0:   # as eagerly: nothing selected,
            applied = applied & (selected > 0)                # nothing learnt
        with torch.no_grad():
            self._update(params, grads, applied)
        method.model.zero_grad(set_to_none=True)
        return _Outputs(run.loss.detach(), run.logits, applied, selected)

    def _update(self, params, grads, applied: torch.Tensor) -> None:
        method = self.method
        group = method.optimizer.param_groups[0]
        lr, updates = self._scalars
        on = applied.to(params[0].dtype)
        masked_adam(params, grads, [method.optimizer.state[p] for p in params], on, lr,
                    group["betas"], group["eps"])
        updates.add_(on)
        anchor, ramp = method.args.anchor, method.args.anchor_ramp
        if anchor > 0:
            share = (updates / ramp).clamp(max=1.0) if ramp > 0 else torch.ones_like(updates)
            torch._foreach_lerp_(params, self._sources, [share * (anchor * on)] * len(params))

    def _result(self, outputs: _Outputs, ratios: Dict[str, float]):
        """The one host read of a step, after everything is queued."""
        from .methods.base import StepResult

        loss, applied, selected = torch.stack(
            [outputs.loss.float(), outputs.applied.float(), outputs.selected.float()]).tolist()
        updated = bool(applied)
        method = self.method
        method.updates += int(updated)
        method.engine.steps += 1
        cache, paper = self._cache
        return StepResult(outputs.logits.detach().clone(), loss, cache, paper, updated=updated,
                          selected=int(selected), mean_keep=mean_keep(ratios),
                          overall_keep=method.engine.overall_keep(ratios))


def _jitter_order(rng: Optional[random.Random] = None) -> Tuple[int, ...]:
    """``augment.jitter_order``, imported late: the methods import this module."""
    from .methods.augment import jitter_order

    return jitter_order(rng)


def _thread_local_capture() -> dict:
    """torch 2.1 on: a capture that other threads' CUDA calls do not invalidate."""
    parameters = inspect.signature(torch.cuda.graph).parameters
    return {"capture_error_mode": "thread_local"} if "capture_error_mode" in parameters else {}
