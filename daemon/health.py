"""Liveness for systemd: WATCHDOG=1 only while serving and learning both make progress.

The serving loop and the learner loop each stamp a heartbeat on every iteration, including the
idle ones (no frame yet, learner paused or waiting for memory), so a quiet camera or a paused
learner is alive, while a hung inference, a deadlocked step or a crashed learner thread is not.
When either heartbeat is older than half the watchdog interval the pings stop, and systemd
restarts the service (which then resumes from its newest checkpoint).
"""

import threading
import time
from typing import Callable, Optional

from .sdnotify import Notifier

__all__ = ["Health"]

STATUS_EVERY_S = 5.0


class Health:
    """Args: notifier; serve_age and learn_age return seconds since each loop's last beat
    (learn_age None when no learner runs); status returns the STATUS= text."""

    def __init__(self, notifier: Notifier, serve_age: Callable[[], float],
                 learn_age: Callable[[], Optional[float]], status: Callable[[], str]):
        self.notifier, self.serve_age, self.learn_age = notifier, serve_age, learn_age
        self.status = status
        self.stale_s = None if notifier.watchdog_s is None else notifier.watchdog_s / 2
        self.pings = 0
        self.withheld: Optional[str] = None      # why the last ping was not sent
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Health":
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="systemd", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def stalled(self) -> Optional[str]:
        """Which loop stopped making progress, or None."""
        limit = self.stale_s
        if limit is None:
            return None
        if self.serve_age() > limit:
            return "serving loop silent for %.1f s" % self.serve_age()
        learn = self.learn_age()
        if learn is not None and learn > limit:
            return "learner silent for %.1f s" % learn
        return None

    def _run(self) -> None:
        ping_every = None if self.stale_s is None else max(0.05, self.stale_s / 2)
        tick = min(STATUS_EVERY_S, ping_every or STATUS_EVERY_S)
        last_status = 0.0
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last_status >= STATUS_EVERY_S:
                self.notifier.status(self.status())
                last_status = now
            if ping_every is None:
                continue
            self.withheld = self.stalled()
            if self.withheld is None:
                self.notifier.watchdog()
                self.pings += 1
