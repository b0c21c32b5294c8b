"""`surgeonctl watch`: a live table from the daemon's PUB stream, events between the rows, a
sparkline of the served confidence, and optionally a PNG of the run kept up to date."""

import collections
import json
import re
import sys
import time
from typing import Any, Deque, Dict, Optional

from .client import ControlClient, DaemonError

__all__ = ["watch", "sparkline", "row"]

COLUMNS = ("time", "fps", "p50 ms", "p99 ms", "steps", "cache MB", "budget MB", "keep", "loss",
           "seeing", "confidence", "source", "learner")
FORMAT = "%-8s %6s %7s %7s %6s %8s %9s %6s %7s %-16s %-16s %-10s %s"
BARS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
ASCII_BARS = "_.-=+*#@"
SPARK_POINTS = 10
HISTORY_SNAPSHOTS = 7200        # what --plot draws: two hours at the default interval


def sparkline(values, low: float = 0.0, high: float = 1.0, bars: str = BARS) -> str:
    """One character per value between ``low`` and ``high``; a gap for a missing one."""
    out = []
    for value in values:
        if value is None:
            out.append(" ")
            continue
        share = (min(max(value, low), high) - low) / (high - low)
        out.append(bars[min(len(bars) - 1, int(share * len(bars)))])
    return "".join(out)


def _bars() -> str:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return BARS if encoding == "utf8" else ASCII_BARS


def _num(value, fmt: str) -> str:
    return fmt % value if isinstance(value, (int, float)) else "-"


def _seeing(snap: Dict[str, Any]) -> str:
    """The most served class over the recent frames and its share (``dent 62%``)."""
    shares = snap.get("classes") or {}
    if not shares:
        return "-"
    name, share = next(iter(shares.items()))
    return "%s %.0f%%" % (str(name)[:11], 100 * share)


def confidence(snap: Dict[str, Any]) -> Optional[float]:
    return ((snap.get("served") or {}).get("adapted") or {}).get("confidence")


def row(snap: Dict[str, Any], trend: str = "") -> str:
    infer = snap.get("latency_ms", {}).get("infer", {})
    source = (snap.get("source") or {}).get("state", "?")
    learner = "paused: " + snap["learner_paused"] if snap.get("learner_paused") else "ok"
    clock = time.strftime("%H:%M:%S", time.localtime(snap.get("time", 0)))
    conf = confidence(snap)
    return FORMAT % (
        clock, _num(snap.get("fps"), "%.1f"),
        _num(infer.get("p50"), "%.2f"), _num(infer.get("p99"), "%.2f"),
        _num(snap.get("learner_steps"), "%d"), _num(snap.get("cache_mb"), "%.2f"),
        _num(snap.get("budget_mb"), "%.1f"), _num(snap.get("overall_keep"), "%.3f"),
        _num(snap.get("loss"), "%.3f"), _seeing(snap),
        "%s %s" % ("-" if conf is None else "%.2f" % conf, trend), source, learner[:40])


class _Plotter:
    """Redraws the PNG every ``every`` snapshots; a failure is said once, never fatal."""

    def __init__(self, path, every: int):
        self.path, self.every = path, max(1, every)
        self.failed = False

    def __call__(self, history, rows: int) -> None:
        if self.path is None or self.failed or rows % self.every:
            return
        from ..plot import PlotError, plot_snapshots

        try:
            plot_snapshots(list(history), self.path, "surgeonctl watch")
        except (PlotError, OSError) as exc:
            self.failed = True
            print("surgeonctl: no plot: %s" % exc, file=sys.stderr)


def watch(client: ControlClient, args) -> None:
    """Rows from ``telemetry`` messages, events as lines between them."""
    pub = client.call("ping").get("pub_endpoint")
    if not pub:
        raise DaemonError("NO_PUB", "the daemon publishes nothing")
    pub = _reachable(pub, client.endpoint)
    header, bars = FORMAT % COLUMNS, _bars()
    history: Deque[Dict[str, Any]] = collections.deque(maxlen=HISTORY_SNAPSHOTS)
    plot = _Plotter(getattr(args, "plot", None), getattr(args, "plot_every", 10))
    rows = 0
    for topic, message in client.subscribe(pub, ["telemetry", "event."], args.idle_timeout):
        if args.json:
            print(json.dumps({"topic": topic, "message": message}, default=str), flush=True)
        elif topic == "telemetry":
            history.append(message)
            if rows % 20 == 0:
                print(header)
            recent = [confidence(s) for s in list(history)[-SPARK_POINTS:]]
            print(row(message, sparkline(recent, bars=bars)), flush=True)
        else:
            fields = " ".join("%s=%s" % (k, v) for k, v in message.items()
                              if k not in ("event", "time"))
            print("! %s %s" % (topic, fields), flush=True)
        if topic == "telemetry":
            rows += 1
            plot(history, rows)
        if args.count and rows >= args.count:
            break
    if history:
        plot(history, 0)            # the last state, whatever the count


def _reachable(pub: str, control: str) -> str:
    """A PUB bound to every interface is reached on the host the control socket was."""
    match = re.match(r"tcp://(\*|0\.0\.0\.0|\[::\]):(\d+)$", pub)
    host = re.match(r"tcp://(.+):\d+$", control)
    if match and host:
        return "tcp://%s:%s" % (host.group(1), match.group(2))
    return pub
