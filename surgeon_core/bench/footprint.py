"""What the box sees of a run of steps: the process's resident set, polled, under whatever
allocator the process runs with (``memory.malloc`` mode, or one preloaded: NOTE [Giving memory
back]). The step peak (NOTE [Step peak]) says what a step needs; this says what the process
keeps for it, which is what tegrastats and psutil report.

Each configuration runs in its own process, so that one's heap does not serve the next.
"""

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..allocator import after_step, allocator_name, before_step
from ..peak import resident_split

__all__ = ["Footprint", "measure_footprint", "FOOTPRINT_CONFIGS"]

FOOTPRINT_CONFIGS = ("full", "daemon")
POLL_S = 0.002


@dataclass
class Footprint:
    config: str
    allocator: str
    steps: int
    rss_start_bytes: int
    rss_growth_bytes: int       # highest resident set during the steps, above the start
    anon_growth_bytes: int      # the same of its anonymous part (RssAnon): no library code
    rss_after_bytes: int        # above the start, after the last step
    anon_after_bytes: int       # the same of its anonymous part
    step_seconds: float         # median after the first two


def _split_now():
    rss, anonymous = resident_split()
    return rss or 0, anonymous or 0


class _HighWater:
    """Polls VmRSS from a thread: the kernel's VmHWM is reset by each step's PeakMeter."""

    def __init__(self):
        self.high, self.anon_high = _split_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss, anonymous = _split_now()
            self.high, self.anon_high = max(self.high, rss), max(self.anon_high, anonymous)
            time.sleep(POLL_S)

    def __enter__(self) -> "_HighWater":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _stepper(config: str, model: torch.nn.Module) -> Callable[[torch.Tensor], None]:
    from ..engine import entropy
    from ..methods.surgeon import Surgeon, SurgeonArgs

    if config == "daemon":
        return Surgeon(model, SurgeonArgs()).step
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def full_step(x: torch.Tensor) -> None:
        before_step()
        entropy(model(x)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()   # as Method.step does
    return full_step


def measure_footprint(config: str, model: torch.nn.Module, x: torch.Tensor,
                      steps: int = 20) -> Footprint:
    """Run ``steps`` steps of ``config`` (``full`` backprop or the ``daemon``'s learner) on
    ``x`` in this process and report its resident set."""
    if config not in FOOTPRINT_CONFIGS:
        raise ValueError("config must be one of %s, got %r" % (FOOTPRINT_CONFIGS, config))
    step = _stepper(config, model)
    before_step()   # the start without what loading left free: the first step hands it back
    start, anon_start = _split_now()
    times = []
    with _HighWater() as meter:
        for _ in range(steps):
            began = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - began)
    after, anon_after = _split_now()
    return Footprint(config, allocator_name(), steps, start, meter.high - start,
                     meter.anon_high - anon_start, after - start, anon_after - anon_start,
                     statistics.median(times[2:] or times))

