"""Counters, per-stage latency percentiles, snapshots and events.

Threads write (serving, learner, grabber); the snapshot reader copies under one lock. Latency
percentiles are over the last ``window`` samples of each stage, so they follow the present.
Events (a rollback, a pause, a source going down) go to every listener, e.g. the control
plane's PUB socket; listeners must return at once.
"""

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

import numpy as np

from .safefiles import shift_numbered

__all__ = ["LatencyWindow", "Telemetry", "JsonlWriter", "STAGES"]

log = logging.getLogger("surgeond")

STAGES = ("capture", "preprocess", "infer", "adapt")
# serving inference split by what the learner was doing: stepping, off or paused, or starting
# (before its first step)
SERVING_SPLIT = ("infer_learner_on", "infer_learner_off", "infer_learner_starting")
SERVED_WINDOW = 256     # frames behind the served confidence, entropy and agreement means


class LatencyWindow:
    """The latest ``size`` durations of one stage, in seconds."""

    def __init__(self, size: int):
        self._samples: Deque[float] = collections.deque(maxlen=size)
        self.count = 0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

    def percentiles_ms(self) -> Dict[str, Optional[float]]:
        if not self._samples:
            return {"p50": None, "p95": None, "p99": None, "n": 0}
        values = np.percentile(np.fromiter(self._samples, float), [50, 95, 99]) * 1000.0
        return {"p50": round(float(values[0]), 3), "p95": round(float(values[1]), 3),
                "p99": round(float(values[2]), 3), "n": self.count}


class _Accuracy:
    """Online accuracy of labelled frames, overall and per replay segment (domain)."""

    def __init__(self):
        self.right: Dict[str, int] = collections.Counter()
        self.seen: Dict[str, int] = collections.Counter()

    def add(self, domain: str, correct: bool) -> None:
        for key in ("all", domain):
            self.seen[key] += 1
            self.right[key] += int(correct)

    def as_dict(self) -> Dict[str, Dict[str, float]]:
        return {k: {"accuracy": self.right[k] / n, "frames": n} for k, n in self.seen.items()}


class Telemetry:
    """Everything the daemon reports; ``snapshot()`` is a JSON-ready dict."""

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.latency = {stage: LatencyWindow(window) for stage in STAGES + SERVING_SPLIT}
        self.counters: Dict[str, int] = collections.Counter()
        self.gauges: Dict[str, Any] = {}
        self.accuracy = {"adapted": _Accuracy(), "source": _Accuracy()}
        self._frame_times: Deque[float] = collections.deque(maxlen=window)
        self._served: Deque[str] = collections.deque(maxlen=window)   # recent class names
        # (confidence, entropy) of recent frames per model, and whether the two agreed
        self._certainty = {m: collections.deque(maxlen=SERVED_WINDOW) for m in ("adapted",
                                                                                  "source")}
        self._agreed: Deque[bool] = collections.deque(maxlen=SERVED_WINDOW)
        self._listeners: List[Callable[[str, Dict[str, Any]], None]] = []
        self._observers: List[Callable[[str, float], None]] = []

    def observe(self, observer: Callable[[str, float], None]) -> None:
        """Also hand every latency sample (stage, seconds) to ``observer`` (the exporter)."""
        self._observers.append(observer)

    def listen(self, listener: Callable[[str, Dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    def event(self, kind: str, /, **fields: Any) -> None:
        """Something an operator should hear about at once, e.g. ``learner.rollback``."""
        self.count("events")
        payload = dict(fields, event=kind, time=time.time())
        for listener in list(self._listeners):
            listener(kind, payload)

    def frame(self, stage_seconds: Dict[str, float]) -> None:
        with self._lock:
            self.counters["frames"] += 1
            self._frame_times.append(time.monotonic())
            for stage, seconds in stage_seconds.items():
                self.latency[stage].add(seconds)
        for observer in self._observers:
            for stage, seconds in stage_seconds.items():
                observer(stage, seconds)

    def stage(self, name: str, seconds: float) -> None:
        with self._lock:
            self.latency[name].add(seconds)
        for observer in self._observers:
            observer(name, seconds)

    def clear_latency(self) -> None:
        """Start every latency window afresh (a benchmark's next phase)."""
        with self._lock:
            for window in self.latency.values():
                window._samples.clear()

    def predicted(self, adapted: Dict[str, Any], source: Optional[Dict[str, Any]] = None) -> None:
        """The served prediction of one frame (and the frozen source model's, when it runs):
        the last one, the recent class shares, confidences, entropies and agreement."""
        with self._lock:
            self._served.append(adapted["name"])
            self.gauges["prediction"] = {k: adapted[k] for k in ("class", "name", "confidence")}
            self._certainty["adapted"].append((adapted["confidence"], adapted["entropy"]))
            if source is not None:
                self._certainty["source"].append((source["confidence"], source["entropy"]))
                self._agreed.append(source["class"] == adapted["class"])

    def _served_means(self) -> Dict[str, Any]:
        means: Dict[str, Any] = {}
        for model, rows in self._certainty.items():
            if rows:
                values = np.asarray(rows, dtype=float).mean(0)
                means[model] = {"confidence": round(float(values[0]), 4),
                                "entropy": round(float(values[1]), 4), "frames": len(rows)}
        if self._agreed:
            means["agreement"] = round(sum(self._agreed) / len(self._agreed), 4)
        return means

    def class_shares(self, top: int = 5) -> Dict[str, float]:
        """Share of each of the ``top`` most served classes over the recent frames."""
        counts = collections.Counter(self._served)
        total = max(1, len(self._served))
        return {name: round(n / total, 4) for name, n in counts.most_common(top)}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def set(self, **values: Any) -> None:
        with self._lock:
            self.gauges.update(values)

    def labelled(self, model: str, domain: Optional[str], correct: bool) -> None:
        with self._lock:
            self.accuracy[model].add(domain or "unknown", correct)

    def fps(self, span_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in self._frame_times if now - t <= span_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(1e-9, recent[-1] - recent[0])

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            snap = {"time": time.time(), "uptime_s": round(time.monotonic() - self.started, 3),
                    "fps": round(self.fps(), 2), "counters": dict(self.counters),
                    "latency_ms": {s: w.percentiles_ms() for s, w in self.latency.items()}}
            snap.update(json.loads(json.dumps(self.gauges, default=_plain)))
            if self._served:
                snap["classes"] = self.class_shares()
                snap["served"] = self._served_means()
            if self.accuracy["adapted"].seen:
                snap["accuracy"] = {k: a.as_dict() for k, a in self.accuracy.items() if a.seen}
            return snap


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


class JsonlWriter:
    """Appends one JSON object per line; flushes each line so a crash loses at most one.

    With ``rotate_mb`` the file moves to ``NAME.1`` (older ones to ``NAME.2`` ...; ``keep`` of
    them) once it reaches that size, and a new one starts: a daemon that runs for months keeps a
    bounded disk. SIGHUP's ``reopen`` serves an outside logrotate instead.
    """

    def __init__(self, path: Optional[str], rotate_mb: Optional[float] = None, keep: int = 5):
        self.path = Path(path) if path else None
        self.max_bytes = None if rotate_mb is None else int(rotate_mb * 2**20)
        self.keep = keep
        self.rotations = 0
        self._file = None
        self.failed_writes = 0
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def write(self, record: Dict[str, Any]) -> None:
        """One line; a failed write (disk full) is counted and logged once, never raised:
        serving must not stop because an output file cannot grow."""
        if self._file is None:
            return
        line = json.dumps(record, default=_plain)
        with self._lock:
            try:
                self._file.write(line + "\n")
                if self.max_bytes is not None and self._file.tell() >= self.max_bytes:
                    self._rotate()
            except (OSError, ValueError) as exc:
                self.failed_writes += 1
                if self.failed_writes == 1:
                    log.error("cannot write %s: %s (lines are dropped until it can)",
                              self.path, exc)

    def _rotate(self) -> None:
        """NAME -> NAME.1 -> ... -> NAME.keep (the oldest dropped), then a new NAME. Called
        under the lock; a failed rename keeps writing the current file."""
        try:
            shift_numbered(self.path, self.keep, lambda i: Path("%s.%d" % (self.path, i)))
            fresh = open(self.path, "a", buffering=1)
        except OSError as exc:
            log.error("cannot rotate %s: %s; still writing it", self.path, exc)
            return
        self._file.close()
        self._file, self.rotations = fresh, self.rotations + 1

    def reopen(self) -> None:
        """After log rotation moved the file (SIGHUP): continue in a new file at the path.
        If it cannot be opened the old handle stays in use."""
        if self.path is None:
            return
        with self._lock:
            try:
                fresh = open(self.path, "a", buffering=1)
            except OSError as exc:
                log.error("cannot reopen %s: %s; still writing the old file", self.path, exc)
                return
            if self._file is not None:
                self._file.close()
            self._file, self.failed_writes = fresh, 0

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:   # the last buffered line could not be flushed
                    log.error("closing %s: %s", self.path, exc)
                self._file = None
