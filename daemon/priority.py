"""Serving first: the learner and the video outputs yield to serving, on the CPU and the GPU.

The learner also gives way while a frame is being served (``ServingTurn``): between any two
layers of its forward it waits for the frame in flight to finish, out of a per-step budget, so
a frame does not queue behind a whole forward of the learner's batch.

On the CPU Linux schedules each thread on its own, so a niced thread leaves the cores to
serving when they are short. On a GPU the serving thread queues its kernels on a high-priority
CUDA stream and the learner on a low-priority one: the GPU's scheduler then starts a frame's
kernels ahead of the learner's queued backward instead of behind it. torch 2.0 (JetPack 5)
offers two levels, -1 (high) and 0 (low); later releases accept more, and -1 still ranks above 0.

NOTE [Sharing the cores]
Serving and the learner run at once, and torch gives each calling thread its own OpenMP team
of, by default, as many threads as there are cores: both together ask for twice the cores,
and a frame's kernels then wait on the learner's at every barrier. So unless told otherwise
the daemon gives torch half the cores it may run on while the learner is on. Measured on this
project's 2-core x86 (``surgeond bench``, BENCHMARKS.md): serving p99 with the learner on went
from 17.5-18.5 ms to 10.1-10.9 (1.26-1.32x the learner paused, where it was 1.5-1.8x), serving
alone from 6.0-6.6 to 4.2-5.2 ms at p50 (one frame gains nothing from a second thread), and the
learner's step from 660-690 to 640 ms at p50. Waiting for frames in flight (``ServingTurn``)
matters little beside it: with it off, p99 was 10.1 ms and the step 526 ms.

Work crosses the streams in two places, each settled on the host so no kernel reads a tensor
another stream is still writing: the learner's step ends with its stream synchronised (an
operator's checkpoint or reset then reads finished weights), and a weight publish waits for
its copies before serving may run again (``daemon/serving.py``).
"""

import contextlib
import logging
import os
import threading
import time
from typing import Optional

__all__ = ["ServingTurn", "torch_threads", "LEARNER_NICE", "OUTPUT_NICE",
           "SERVING_STREAM_PRIORITY", "LEARNER_STREAM_PRIORITY", "lower_thread_priority",
           "cuda_stream", "on_stream", "settle"]

log = logging.getLogger("surgeond.priority")

LEARNER_NICE = 5      # adaptation yields the CPU to serving
OUTPUT_NICE = 10      # encoding yields it to serving and the learner
SERVING_STREAM_PRIORITY = -1
LEARNER_STREAM_PRIORITY = 0


def torch_threads(configured: int, learner_on: bool) -> Optional[int]:
    """The torch CPU threads to set (NOTE [Sharing the cores]): ``configured`` when it is
    positive, else half the cores this process may run on while the learner is on; None
    (torch's own default) without a learner or where OMP_NUM_THREADS already decides."""
    if configured > 0:
        return configured
    if not learner_on or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def lower_thread_priority(nice: int, who: str) -> None:
    """Set the calling thread's nice value (Linux: per thread, through its TID)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:
        log.debug("%s thread keeps its priority: %s", who, exc)


def cuda_stream(device, priority: int):
    """A CUDA stream of ``priority`` on ``device`` (a torch.device); None off CUDA or where
    none can be made. torch is imported here: the output thread uses this module without it."""
    if device.type != "cuda":
        return None
    import torch

    try:
        return torch.cuda.Stream(device=device, priority=priority)
    except (RuntimeError, TypeError) as exc:   # an old driver or build: the default stream
        log.warning("no CUDA stream of priority %d on %s (%s): using the default stream",
                    priority, device, exc)
        return None


@contextlib.contextmanager
def on_stream(stream):
    """Queue the calling thread's CUDA work on ``stream`` (thread-local); no-op for None."""
    if stream is None:
        yield
        return
    import torch

    with torch.cuda.stream(stream):
        yield


def settle(stream) -> None:
    """Wait on the host until everything queued on ``stream`` has run; no-op for None."""
    if stream is not None:
        stream.synchronize()


class ServingTurn:
    """Serving marks each frame with ``serving()``; the learner's forward, between layers, calls
    ``give_way()`` and waits while a frame is in flight, until it is served, out of a budget of
    waiting per step (``begin_step``): a serving loop that is never idle slows a step by the
    budget at most, and cannot starve the learner (or silence its watchdog heartbeat).

    Hooks attached with ``attach`` act only in the thread that attached them (the learner's), so
    a copy of the model made later, or a forward run by another thread, never waits.
    """

    def __init__(self, budget_s: float = 0.1):
        self.budget_s = budget_s
        self._left = budget_s
        self._idle = threading.Event()
        self._idle.set()
        self.waits = 0
        self.waited_s = 0.0

    @contextlib.contextmanager
    def serving(self):
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    def begin_step(self, budget_s: float) -> None:
        """A new learner step may wait ``budget_s`` in all."""
        self.budget_s = self._left = budget_s

    def give_way(self) -> None:
        if self._idle.is_set() or self._left <= 0:
            return
        start = time.monotonic()
        self._idle.wait(self._left)
        waited = time.monotonic() - start
        self._left -= waited
        self.waits += 1
        self.waited_s += waited

    def attach(self, model) -> list:
        """A pre-hook on every leaf module of ``model``; returns the handles (``.remove()``)."""
        owner = threading.get_ident()

        def hook(module, args):
            if threading.get_ident() == owner:
                self.give_way()

        return [m.register_forward_pre_hook(hook) for m in model.modules()
                if next(m.children(), None) is None]
