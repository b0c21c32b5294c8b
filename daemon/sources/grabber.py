"""The grab thread: newest frame only, a read watchdog, rebuilds with exponential backoff.

NOTE [Grabber]
``cv2.VideoCapture.read`` can block forever after a network camera drops (opencv#22677), so a
hung read cannot be interrupted, only abandoned. Each connection attempt therefore runs in its
own reader thread tagged with a generation number; the supervisor declares it stalled when no
frame arrives within ``read_timeout_s``, bumps the generation (so a read that returns late is
ignored), releases the device from a helper thread and starts a new attempt after a backoff
that doubles up to ``reconnect_max_s`` and resets once frames flow again.

Abandoned readers are kept count of: while MAX_HUNG of them are still blocked (a FIFO, a driver
that never returns) no new attempt starts, so a source that hangs every read cannot pile up
threads and the memory they hold. Such a source is ``stuck``: only a new process frees those
threads, so the daemon then stops with EX_TEMPFAIL for systemd to restart it (from its newest
checkpoint). A factory or a
reader that raises anything is a failed attempt with its error reported, never a dead thread.

Live sources overwrite the one pending frame (older unconsumed frames count as drops);
non-live sources (files, directories, replay) hand over every frame and wait for the consumer.
"""

import logging
import threading
import time
from typing import Callable, List, Optional

from .base import EndOfStream, Frame, FrameSource

__all__ = ["Grabber", "SourceState"]

log = logging.getLogger("surgeond.source")
MAX_HUNG = 4          # abandoned reads still blocked before no new attempt starts


class SourceState:
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    ENDED = "ended"
    STOPPED = "stopped"


class Grabber:
    """Owns a source's lifecycle. ``get(timeout)`` returns the next frame to serve.

    Args:
        factory: builds a fresh, unopened source (a rebuild calls it again).
        read_timeout_s: no frame for this long (open included) means the source is dead.
        backoff_initial_s, backoff_max_s: the wait before a rebuild, doubling per failure.
    """

    def __init__(self, factory: Callable[[], FrameSource], read_timeout_s: float = 3.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0):
        self._factory = factory
        self.read_timeout_s = read_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self._cond = threading.Condition()
        self._pending: Optional[Frame] = None
        self._generation = 0
        self._heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self.on_state: Optional[Callable[[str, str], None]] = None   # (old, new), must not block
        self._supervisor: Optional[threading.Thread] = None
        self.state = SourceState.CONNECTING
        self.live = True
        self.frames = 0          # frames captured
        self.drops = 0           # live frames overwritten before anyone served them
        self.reconnects = 0      # rebuilds after a failure or stall
        self.failures = 0
        self.last_error: Optional[str] = None
        self.description = ""
        self._hung: List[threading.Thread] = []

    # -- consumer side -------------------------------------------------------------------
    def start(self) -> "Grabber":
        self._supervisor = threading.Thread(target=self._supervise, name="grabber", daemon=True)
        self._supervisor.start()
        return self

    def get(self, timeout: float) -> Optional[Frame]:
        """The next frame, or None after ``timeout`` s (or once the stream ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is None and self.state not in (SourceState.ENDED,
                                                                SourceState.STOPPED):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            frame, self._pending = self._pending, None
            self._cond.notify_all()
            return frame

    @property
    def ended(self) -> bool:
        with self._cond:
            return self.state == SourceState.ENDED and self._pending is None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            self._generation += 1
            self.state = SourceState.STOPPED
            self._cond.notify_all()
        if self._supervisor is not None:
            self._supervisor.join(timeout)

    def restart(self) -> None:
        """Rebuild the source now (an operator's request), skipping any backoff."""
        self._restart.set()

    @property
    def stuck(self) -> bool:
        """MAX_HUNG abandoned reads are still blocked: the source cannot be rebuilt."""
        self._hung = [thread for thread in self._hung if thread.is_alive()]
        return len(self._hung) >= MAX_HUNG

    def stats(self) -> dict:
        return {"state": self.state, "frames": self.frames, "drops": self.drops,
                "reconnects": self.reconnects, "failures": self.failures,
                "last_error": self.last_error, "source": self.description}

    # -- supervisor ----------------------------------------------------------------------
    def _supervise(self) -> None:
        backoff = self.backoff_initial_s
        while not self._stop.is_set():
            outcome = self._attempt()
            if outcome == "ended" or self._stop.is_set():
                return
            with self._cond:
                self._generation += 1   # a late read from the old attempt is now ignored
            if outcome == "restart":
                log.info("source %s: restarting on request", self.description)
                backoff = self.backoff_initial_s
                self.reconnects += 1
                continue
            if outcome == "streamed":
                backoff = self.backoff_initial_s
            self.failures += 1
            with self._cond:
                self._set_state(SourceState.BACKOFF)
            log.warning("source %s: %s; rebuilding in %.1f s", self.description,
                        self.last_error, backoff)
            if self._wait_backoff(backoff):
                return
            backoff = min(backoff * 2, self.backoff_max_s)
            self.reconnects += 1

    def _attempt(self) -> str:
        """One connection: build, read until it ends, fails or stalls; the outcome."""
        if self.stuck:
            self.last_error = ("%d earlier reads are still blocked; no new attempt until one "
                               "returns" % len(self._hung))
            return "failed"
        try:
            source = self._factory()
        except Exception as exc:  # noqa: BLE001 - a source that cannot even be built
            self.last_error = "cannot build the source: %s: %s" % (type(exc).__name__, exc)
            return "failed"
        self.description = source.describe()
        self.live = source.live
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._heartbeat = time.monotonic()
            self._set_state(SourceState.CONNECTING)
        reader = threading.Thread(target=self._read_loop, args=(source, generation),
                                  name="grab-%d" % generation, daemon=True)
        reader.start()
        outcome = self._watch(reader, generation)
        if reader.is_alive():
            self._hung.append(reader)
        threading.Thread(target=source.close, name="release", daemon=True).start()
        return outcome

    def _wait_backoff(self, seconds: float) -> bool:
        """Sleep out a backoff; True when stopped, False when done or a restart cut it short."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._restart.is_set():
            if self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return True
        self._restart.clear()
        return self._stop.is_set()

    def _watch(self, reader: threading.Thread, generation: int) -> str:
        """Wait for the reader to end or stall: 'ended', 'failed' or 'streamed' (then failed)."""
        streamed = False
        while not self._stop.is_set():
            reader.join(0.05)
            if self._restart.is_set():
                self._restart.clear()
                return "restart"
            with self._cond:
                streamed = streamed or self.state == SourceState.STREAMING
                if self.state == SourceState.ENDED:
                    return "ended"
                if not reader.is_alive():
                    return "streamed" if streamed else "failed"
                waiting_on_consumer = self._pending is not None and not self.live
                if waiting_on_consumer:
                    self._heartbeat = time.monotonic()
                if time.monotonic() - self._heartbeat > self.read_timeout_s:
                    self.last_error = "no frame for %.1f s" % self.read_timeout_s
                    return "streamed" if streamed else "failed"
        return "stopped"

    def _read_loop(self, source: FrameSource, generation: int) -> None:
        try:
            source.open()
            while True:
                frame = source.read()
                if not self._deliver(frame, generation):
                    return
        except EndOfStream:
            with self._cond:
                if generation == self._generation:
                    self._set_state(SourceState.ENDED)
        except Exception as exc:  # noqa: BLE001 - CaptureError, OSError, cv2.error, MemoryError...
            with self._cond:
                if generation == self._generation:
                    self.last_error = "%s: %s" % (type(exc).__name__, exc)

    def _deliver(self, frame: Frame, generation: int) -> bool:
        with self._cond:
            if generation != self._generation:
                return False
            if self._pending is not None:
                if self.live:
                    self.drops += 1
                else:
                    while self._pending is not None and generation == self._generation:
                        self._heartbeat = time.monotonic()
                        self._cond.wait(0.1)
                    if generation != self._generation:
                        return False
            self._pending = frame
            self.frames += 1
            self._heartbeat = time.monotonic()
            if self.state != SourceState.STREAMING:
                self._set_state(SourceState.STREAMING)
            self._cond.notify_all()
            return True

    def _set_state(self, state: str) -> None:
        if state != self.state and self.state != SourceState.STOPPED:
            log.info("source %s: %s -> %s", self.description, self.state, state)
            old, self.state = self.state, state
            if self.on_state is not None:
                self.on_state(old, state)
