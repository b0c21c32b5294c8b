"""The output thread: newest frame only, overlay drawn once, every sink fed, failures retried.

Serving hands each frame over with ``offer`` and returns at once: a frame not yet taken when
the next arrives is replaced and counted as a drop, so a slow encoder or a stalled client can
never hold serving up; the thread runs niced, so where cores are short encoding yields to
serving and the learner. A sink that fails to open or write is closed, reported, and opened again
after a backoff that doubles up to ``backoff_max_s``; it is never fatal after start.
"""

import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..priority import OUTPUT_NICE, lower_thread_priority
from .base import VideoSink
from .overlay import FrameInfo, StatusInfo, draw_overlay, enlarge, learner_text

__all__ = ["VideoOutputs", "SinkState"]

log = logging.getLogger("surgeond.output")


class SinkState:
    """One sink's lifecycle: closed -> open, or failed until ``retry_at``."""

    def __init__(self, sink: VideoSink, backoff_initial_s: float, backoff_max_s: float):
        self.sink = sink
        self.state = "closed"
        self.frames = self.failures = 0
        self.last_error: Optional[str] = None
        self.retry_at = 0.0
        self.backoff_initial_s = self.backoff = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    def fail(self, error: str) -> None:
        try:
            self.sink.close()
        except Exception as exc:  # noqa: BLE001 - a sink that cannot even close is still retried
            log.debug("closing %s: %s", self.sink.spec.uri, exc)
        self.failures += 1
        if error != self.last_error:
            log.warning("output %s: %s; retrying in %.0f s", self.sink.spec.uri, error,
                        self.backoff)
        self.state, self.last_error = "failed", error
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max_s)

    def stats(self) -> Dict:
        return {"uri": self.sink.spec.uri, "state": self.state, "frames": self.frames,
                "failures": self.failures, "skipped": self.sink.skipped,
                "last_error": self.last_error,
                "detail": self.sink.detail or None}


class VideoOutputs:
    """Feeds ``sinks`` from its own thread; ``size`` is fixed by the first frame (enlarged to
    ``min_height`` and made even for the encoders), later frames are scaled to it."""

    def __init__(self, sinks: List[VideoSink], fps: float, overlay: bool = True,
                 min_height: int = 360, learner_enabled: bool = True,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0):
        self.states = [SinkState(s, backoff_initial_s, backoff_max_s) for s in sinks]
        self.fps, self.overlay, self.min_height = fps, overlay, min_height
        self.learner_enabled = learner_enabled
        self.size: Optional[Tuple[int, int]] = None
        self.offered = self.drops = self.written = 0
        self.status_info = StatusInfo()
        self._rollbacks, self._rollback_seen_at = 0, None
        self._slot: Optional[Tuple[np.ndarray, FrameInfo]] = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "VideoOutputs":
        self._thread = threading.Thread(target=self._loop, name="video-output", daemon=True)
        self._thread.start()
        return self

    def offer(self, image: np.ndarray, info: FrameInfo) -> None:
        """From the serving thread: never blocks beyond a lock held for an assignment."""
        with self._cond:
            if self._slot is not None:
                self.drops += 1
            self._slot = (image, info)
            self.offered += 1
            self._cond.notify()

    def status(self, snap: Dict) -> None:
        """From the telemetry thread, once per snapshot."""
        rollbacks = (snap.get("counters") or {}).get("rollbacks", 0)
        if rollbacks > self._rollbacks:
            self._rollbacks, self._rollback_seen_at = rollbacks, time.monotonic()
        self.status_info = StatusInfo(
            fps=snap.get("fps") or 0.0, cache_mb=snap.get("cache_mb"),
            budget_mb=snap.get("budget_mb"),
            learner=learner_text(snap, self.learner_enabled, self._rollback_seen_at))

    def stats(self) -> Dict:
        return {"offered": self.offered, "written": self.written, "drops": self.drops,
                "size": None if self.size is None else list(self.size),
                "sinks": [state.stats() for state in self.states]}

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for state in self.states:
            try:
                state.sink.close()
            except Exception:  # noqa: BLE001 - closing the others matters more
                log.exception("closing output %s", state.sink.spec.uri)
            state.state = "closed"

    def _take(self) -> Optional[Tuple[np.ndarray, FrameInfo]]:
        with self._cond:
            while self._slot is None and not self._stop.is_set():
                self._cond.wait(0.5)
            item, self._slot = self._slot, None
            return item

    def _loop(self) -> None:
        lower_thread_priority(OUTPUT_NICE, "output")
        while not self._stop.is_set():
            self._round(self._take())
        # a frame offered while the last one was being written: the recording's final frame,
        # written rather than lost uncounted (serving has stopped offering by now)
        with self._cond:
            item, self._slot = self._slot, None
        self._round(item)

    def _round(self, item: Optional[Tuple[np.ndarray, FrameInfo]]) -> None:
        if item is None:
            return
        try:
            self._emit(self.render(*item))
        except Exception:  # noqa: BLE001 - the output thread must outlive a bad frame
            log.exception("video output round failed")

    def render(self, image: np.ndarray, info: FrameInfo) -> np.ndarray:
        import cv2

        image = enlarge(image, self.min_height)
        if self.size is None:
            self.size = (image.shape[1] // 2 * 2, image.shape[0] // 2 * 2)
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        return draw_overlay(image, info, self.status_info) if self.overlay else image

    def _emit(self, image: np.ndarray) -> None:
        now = time.monotonic()
        for state in self.states:
            if state.state != "open":
                if now < state.retry_at:
                    continue
                try:
                    state.sink.open(self.size[0], self.size[1], self.fps)
                except Exception as exc:  # noqa: BLE001 - any failure is retried the same way
                    state.fail(str(exc) or type(exc).__name__)
                    continue
                state.state, state.backoff = "open", state.backoff_initial_s
                log.info("output %s open: %s", state.sink.spec.uri, state.sink.detail)
            try:
                state.sink.write(image)
                state.frames += 1
            except Exception as exc:  # noqa: BLE001 - OutputUnavailable, cv2.error, OSError
                state.fail(str(exc) or type(exc).__name__)
        self.written += 1
