"""The background learner: a ring buffer of recent frames, steps under a memory budget,
weights published to serving, rollback on NaN or collapse.

NOTE [Learner health]
A step whose logits are not finite means the weights themselves are poisoned (the methods'
update guard keeps non-finite gradients out, so this is corruption from outside: a bad
checkpoint, a bit flip, a bug). A collapse is entropy falling toward zero with predictions
piling onto one class for ``COLLAPSE_STEPS`` steps in a row: the classic failure of entropy
minimisation. Either rolls the learner back to the last good snapshot (taken every
``good_every`` healthy steps), or to the source weights when that snapshot failed too, and is
counted. Nothing unhealthy is ever published to serving.
"""

import collections
import copy
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional

import torch

from surgeon_core.engine import entropy as sample_entropy
from surgeon_core.errors import BudgetExceeded

from .memory import MB, is_out_of_memory
from .priority import (LEARNER_NICE, LEARNER_STREAM_PRIORITY, cuda_stream, lower_thread_priority,
                       on_stream, settle)
from .serving import ServingModel, publish_weights
from .telemetry import Telemetry

__all__ = ["RingBuffer", "Learner", "COLLAPSE_STEPS", "RECOVER_STEPS"]

log = logging.getLogger("surgeond.learner")
COLLAPSE_STEPS = 3
RECOVER_STEPS = 100   # clean steps after a shrink before the batch and budget grow back
MAX_FAULT_BACKOFF_S = 60.0


class RingBuffer:
    """The latest ``size`` preprocessed frames (uint8 CHW), with a count of all ever added."""

    def __init__(self, size: int):
        self._frames: Deque[torch.Tensor] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.added = 0

    def push(self, frame: torch.Tensor) -> None:
        with self._lock:
            self._frames.append(frame)
            self.added += 1

    def __len__(self) -> int:
        return len(self._frames)

    def latest(self, n: int) -> torch.Tensor:
        with self._lock:
            frames = list(self._frames)[-n:]
        return torch.stack(frames)


class Learner:
    """Runs ``method.step`` on batches of recent frames in its own thread.

    Args:
        method: a surgeon_core method (its ``model`` is the learner copy).
        serving: the serving copy that receives published weights.
        config: LearnerConfig.
        telemetry: where counters and gauges go.
        budget_fn: returns (cache budget bytes, reason[, peak budget bytes]) -- the memory
            policy, re-read every poll (NOTE [Peak budget]).
        poll_s: seconds between budget re-reads.
    """

    def __init__(self, method, serving: ServingModel, config, telemetry: Telemetry,
                 device: torch.device,
                 budget_fn: Optional[Callable[[], tuple]] = None, poll_s: float = 5.0):
        self.method, self.serving, self.config = method, serving, config
        self.telemetry, self.device = telemetry, device
        self.budget_fn, self.poll_s = budget_fn, poll_s
        self.buffer = RingBuffer(config.buffer_size)
        self.batch_size = config.batch_size
        self.steps = 0
        self.paused_reason: Optional[str] = None     # why the learner is not stepping
        self.user_paused = False
        self._budget_cap: Optional[int] = None        # operator's cap (set_budget_cap)
        self._oom_cap: Optional[int] = None           # halved budget after an out-of-memory
        self._clean_steps = 0                         # steps since the last shrink
        self._budget_bytes: Optional[int] = None
        self._last_poll = -math.inf
        self._used_until = 0
        self._collapse_run = 0
        self._healthy_since_good = 0
        self._good = self._snapshot()
        self._good_failed = False
        self._faults_in_row = 0
        self._pairs = serving.pairs_with(method.model)
        self._captured = getattr(method, "captured", None)   # NOTE [Captured step]
        if self._captured is not None:   # no frame's CUDA calls inside a capture
            self._captured.guard = lambda: serving.lock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._exclusive = threading.RLock()   # a step, or an operator's change of state
        self._beat = time.monotonic()          # the loop's last round (systemd's watchdog)
        self._thread: Optional[threading.Thread] = None
        self._stream = None   # the learner's low-priority CUDA stream, made by its thread
        self._give_way: list = []   # its forward's hooks that wait for a frame in flight
        # (step, measured cache bytes, budget bytes in force) of recent steps
        self.step_log: Deque[tuple] = collections.deque(maxlen=100_000)

    # -- control -------------------------------------------------------------------------
    def start(self) -> "Learner":
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self, paused: bool = True) -> None:
        if paused != self.user_paused:
            self.telemetry.event("learner.paused" if paused else "learner.resumed",
                                 reason="operator")
        self.user_paused = paused
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- state, for checkpoints and resets (each waits for a step in progress) ------------
    def export_state(self) -> Dict[str, Any]:
        with self._exclusive:
            return copy.deepcopy(self.method.state_dict())

    def import_state(self, state: Dict[str, Any], steps: Optional[int] = None) -> str:
        """Load a checkpoint's state, publish it to serving; a note if the optimizer's failed."""
        with self._exclusive:
            note = self._load_state(state)
            if steps is not None:
                self.steps = steps
            self._after_state_change()
        return note

    def _load_state(self, state: Dict[str, Any]) -> str:
        model_state = state.get("model")
        if not isinstance(model_state, dict):
            raise ValueError("the checkpoint holds no model state")
        _check_tensors(self.method.model.state_dict(), model_state)
        self.method.model.load_state_dict(model_state)
        if isinstance(state.get("updates"), int) and hasattr(self.method, "updates"):
            self.method.updates = state["updates"]   # where the anchor's ramp stood
        optimizer = getattr(self.method, "optimizer", None)
        if optimizer is None or "optimizer" not in state:
            return ""
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            optimizer.load_state_dict(self.method._source["optimizer"])
            return "optimizer state not restored (%s); it starts afresh" % exc
        return ""

    def reset_to_source(self) -> None:
        """The source weights, statistics and optimizer state, exactly; also in serving."""
        with self._exclusive:
            self.method.reset()
            self._after_state_change()

    def set_lr(self, lr: float) -> None:
        optimizer = getattr(self.method, "optimizer", None)
        if optimizer is None:
            raise ValueError("method %s has no optimizer" % self.method.name)
        with self._exclusive:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def set_method_option(self, name: str, value: float) -> None:
        """A method option read at every step (margin, consistency weight, keep floor)."""
        with self._exclusive:
            self.method.args = dataclasses.replace(self.method.args, **{name: value})
            engine = getattr(self.method, "engine", None)
            if engine is not None and hasattr(engine.config, name):
                engine.config = dataclasses.replace(engine.config, **{name: value})

    def _after_state_change(self) -> None:
        self._good, self._good_failed = self._snapshot(), False
        self._collapse_run = self._healthy_since_good = 0
        publish_weights(self._pairs, self.serving.lock)

    def replan(self) -> None:
        """Re-read the memory policy before the next step (its settings changed)."""
        self._last_poll = -math.inf
        self._wake.set()

    def set_budget_cap(self, megabytes: Optional[float]) -> None:
        """An operator's cap on the cache, applied from the next step."""
        self._budget_cap = None if megabytes is None else int(megabytes * MB)
        self._last_poll = -math.inf
        self._wake.set()

    def offer(self, frame: torch.Tensor) -> None:
        self.buffer.push(frame)
        self._wake.set()

    @property
    def budget_bytes(self) -> Optional[int]:
        return self._budget_bytes

    # -- loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        """The loop, restarted after anything it raises: a transient fault (no descriptor left
        for /proc/meminfo, a driver hiccup) pauses adaptation, never ends it for good. Faults
        in a row back off exponentially (1 s to 60 s) so a permanent one costs nothing."""
        lower_thread_priority(LEARNER_NICE, "learner")   # serving first (daemon/priority.py)
        self._stream = cuda_stream(self.device, LEARNER_STREAM_PRIORITY)
        self._give_way = self.serving.turn.attach(self.method.model)
        while not self._stop.is_set():
            try:
                with on_stream(self._stream):
                    self._loop()
                return
            except Exception as exc:  # noqa: BLE001 - serving goes on; the reason is reported
                self._faults_in_row += 1
                wait = min(MAX_FAULT_BACKOFF_S, 2.0 ** (self._faults_in_row - 1))
                log.exception("learner fault; its loop restarts in %.0f s", wait)
                self.telemetry.count("learner_faults")
                self._pause_for("learner fault: %s: %s" % (type(exc).__name__, exc))
                self._stop.wait(wait)
                self._beat = time.monotonic()

    def beat_age(self) -> Optional[float]:
        """Seconds since the loop last went round; None when the learner never started."""
        return None if self._thread is None else time.monotonic() - self._beat

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            self._refresh_budget()
            if not self._ready():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            with self._exclusive:
                try:
                    self._step()
                finally:   # an operator's save or reset reads finished weights
                    settle(self._stream)

    def _ready(self) -> bool:
        if self.user_paused or (self.paused_reason and not self._budget_bytes):
            return False
        fresh = self.buffer.added - self._used_until
        return len(self.buffer) >= self.batch_size and fresh >= self.config.fresh_frames

    def _refresh_budget(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self.poll_s:
            return
        self._last_poll = now
        policy = (None, "no memory policy") if self.budget_fn is None else self.budget_fn()
        budget, reason = policy[0], policy[1]
        peak = policy[2] if len(policy) > 2 else None
        for cap, who in ((self._budget_cap, "operator cap"), (self._oom_cap, "after OOM")):
            if cap is not None and (budget is None or cap < budget):
                budget, reason = cap, "%s %.1f MB" % (who, cap / MB)
        if self._oom_cap is not None and peak is not None:
            peak = min(peak, self._oom_cap)
        if _changed(self._budget_bytes, budget):
            self.telemetry.event("budget.changed", budget_mb=None if budget is None
                                 else round(budget / MB, 3), reason=reason)
        self._budget_bytes = budget
        if budget == 0:
            self._pause_for("no memory for the cache: " + reason)
            return
        if self.paused_reason and self.paused_reason.startswith("no memory"):
            self._resume()
        engine = getattr(self.method, "engine", None)
        if engine is not None:
            engine.set_budget(budget)
            engine.set_peak_budget(peak)
        self.telemetry.set(budget_mb=_mb(budget), budget_reason=reason,
                           peak_budget_mb=_mb(peak),
                           peak_bounded=engine is not None and engine.peak_bounded)

    def _pause_for(self, reason: str) -> None:
        if self.paused_reason != reason:
            log.warning("learner paused: %s", reason)
            self.telemetry.count("learner_pauses")
            self.telemetry.event("learner.paused", reason=reason)
        self.paused_reason = reason
        self.telemetry.set(learner_paused=reason)

    def _resume(self) -> None:
        log.info("learner resumed")
        self.paused_reason = None
        self.telemetry.set(learner_paused=None)
        self.telemetry.event("learner.resumed", reason="memory")

    def _step(self) -> None:
        self.serving.turn.begin_step(self.config.yield_ms / 1000.0)   # live changes apply
        self._used_until = self.buffer.added
        x = self.buffer.latest(self.batch_size).to(self.device).float().div_(255.0)
        try:
            result = self.method.step(x)
        except BudgetExceeded as exc:
            self._shrink("budget below the floor at batch %d: %s" % (self.batch_size, exc))
            return
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            self._out_of_memory(exc)
            return
        self.steps += 1
        self._faults_in_row = 0
        if self.paused_reason:
            self._resume()
        self.telemetry.stage("adapt", result.seconds)
        self._report(result)
        self.step_log.append((self.steps, result.cache_bytes, self._budget_bytes))
        if not self._healthy(result):
            return
        if self._starved(result):
            self._shrink("budget starved: %.1f MB leaves no layer enough to train at batch %d"
                         % ((self._budget_bytes or 0) / MB, self.batch_size))
        else:
            self._maybe_recover()
        if self.steps % self.config.publish_every == 0:
            publish_weights(self._pairs, self.serving.lock)
            self.telemetry.count("publishes")
        self._good_failed = False
        self._healthy_since_good += 1
        if self._healthy_since_good >= self.config.good_every:
            self._good, self._healthy_since_good = self._snapshot(), 0

    def _starved(self, result) -> bool:
        """A sparse step under a budget that kept too little in every prunable layer to train any
        (``overall_keep`` is None where nothing is prunable, e.g. a quantised x_hat)."""
        sparse = getattr(self.method, "engine", None) is not None
        return (sparse and bool(self._budget_bytes) and result.mean_keep is None
                and result.overall_keep is not None)

    def _maybe_recover(self) -> None:
        """After RECOVER_STEPS clean steps, double the batch back and drop the OOM cap."""
        self._clean_steps += 1
        shrunk = self.batch_size < self.config.batch_size or self._oom_cap is not None
        if not shrunk or self._clean_steps < RECOVER_STEPS:
            return
        self.batch_size = min(self.config.batch_size, self.batch_size * 2)
        self._oom_cap, self._clean_steps = None, 0
        self._last_poll = -math.inf
        log.info("%d clean steps: batch back to %d", RECOVER_STEPS, self.batch_size)
        self.telemetry.count("batch_regrowths")
        self.telemetry.set(batch_size=self.batch_size)

    def _shrink(self, why: str) -> None:
        """Halve the batch; at the minimum, pause with the reason until the budget changes."""
        self._clean_steps = 0
        if self.batch_size > self.config.min_batch_size:
            self.batch_size = max(self.config.min_batch_size, self.batch_size // 2)
            log.warning("%s; batch now %d", why, self.batch_size)
            self.telemetry.count("batch_shrinks")
            self.telemetry.set(batch_size=self.batch_size)
        else:
            self._pause_for(why)
            self._budget_bytes = 0   # wait for the next budget reading

    def _out_of_memory(self, exc: BaseException) -> None:
        self.telemetry.count("out_of_memory")
        self.method.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        engine = getattr(self.method, "engine", None)
        if engine is not None and self._budget_bytes:
            self._oom_cap = self._budget_bytes // 2
            self._last_poll = -math.inf
        self._shrink("out of memory (%s)" % str(exc).splitlines()[0][:120])

    def _report(self, result) -> None:
        self.telemetry.count("steps")
        self.telemetry.count("updates", int(result.updated))
        self.telemetry.set(loss=result.loss, cache_mb=result.cache_bytes / MB,
                           paper_mb=result.paper_bytes / MB, mean_keep=result.mean_keep,
                           overall_keep=result.overall_keep, batch_size=self.batch_size,
                           selected=result.selected, learner_steps=self.steps,
                           peak_mb=_mb(result.peak_bytes), reserved_mb=_mb(result.reserved_bytes),
                           gave_way=self.serving.turn.waits,
                           gave_way_s=round(self.serving.turn.waited_s, 3),
                           resident_peak_mb=_mb(result.resident_bytes),
                           micro_batches=result.chunks)
        if self._captured is not None:
            self.telemetry.set(cuda_graph=self._captured.summary())

    def _healthy(self, result) -> bool:
        if not bool(torch.isfinite(result.logits).all()):
            self._rollback("non-finite logits: the learner's weights are poisoned")
            return False
        logits = result.logits.float()
        classes = logits.shape[1]
        mean_entropy = float(sample_entropy(logits).mean())
        self.telemetry.set(entropy=mean_entropy)
        entropy = mean_entropy / math.log(classes)
        top_share = float(logits.argmax(1).bincount(minlength=classes).max()) / logits.shape[0]
        collapsing = (entropy < self.config.collapse_entropy
                      and top_share >= self.config.collapse_class_share)
        self._collapse_run = self._collapse_run + 1 if collapsing else 0
        if self._collapse_run >= COLLAPSE_STEPS:
            self._rollback("collapse: entropy %.3f of ln C, %.0f%% one class"
                           % (entropy, 100 * top_share))
            return False
        return True

    def _rollback(self, why: str) -> None:
        if self._good_failed:   # failed again straight after a rollback: the snapshot is bad
            self.method.reset()
            self._good = self._snapshot()
            target = "source weights"
        else:
            self.method.load_state_dict(copy.deepcopy(self._good))
            target = "last good state"
        log.warning("rollback to %s: %s", target, why)
        self.telemetry.count("rollbacks")
        self.telemetry.set(last_rollback="%s (%s)" % (why, target))
        self.telemetry.event("learner.rollback", reason=why, target=target)
        self._good_failed = True
        self._collapse_run = 0
        self._healthy_since_good = 0
        publish_weights(self._pairs, self.serving.lock)

    def _snapshot(self):
        return copy.deepcopy(self.method.state_dict())


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / MB


def _changed(old: Optional[int], new: Optional[int], tolerance: float = 0.05) -> bool:
    """A budget change worth an event: None <-> a value, or more than ``tolerance`` apart."""
    if old is None or new is None:
        return old != new
    return abs(new - old) > tolerance * max(old, new, 1)


def _check_tensors(current: Dict[str, torch.Tensor], incoming: Dict[str, Any]) -> None:
    """Refuse a state that would load partly: names, shapes and finiteness, before any copy."""
    missing, extra = current.keys() - incoming.keys(), incoming.keys() - current.keys()
    if missing or extra:
        raise ValueError("model state differs: missing %s, unexpected %s"
                         % (sorted(missing)[:5], sorted(extra)[:5]))
    for key, tensor in current.items():
        value = incoming[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            raise ValueError("%s: expected a tensor of shape %s" % (key, tuple(tensor.shape)))
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError("%s holds non-finite values" % key)
