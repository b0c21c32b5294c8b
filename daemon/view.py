"""A live one-line terminal view of telemetry snapshots, and the end-of-run summary."""

import sys
from typing import Dict, Optional, TextIO

__all__ = ["TerminalView", "summary_text"]


def _ms(latency: Dict, stage: str, key: str) -> str:
    value = latency.get(stage, {}).get(key)
    return "-" if value is None else "%.1f" % value


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else "%.1f%%" % (100 * value)


def status_line(snap: Dict) -> str:
    lat = snap.get("latency_ms", {})
    cache, budget = snap.get("cache_mb"), snap.get("budget_mb")
    parts = ["t=%4.0fs" % snap.get("uptime_s", 0), "fps %5.1f" % snap.get("fps", 0),
             "infer p50/p99 %s/%s ms" % (_ms(lat, "infer", "p50"), _ms(lat, "infer", "p99")),
             "adapt p50 %s ms" % _ms(lat, "adapt", "p50"),
             "cache %s/%s MB" % ("-" if cache is None else "%.1f" % cache,
                                  "-" if budget is None else "%.1f" % budget),
             "steps %d" % snap.get("counters", {}).get("steps", 0)]
    prediction = snap.get("prediction")
    if prediction:
        parts.append("last %s %.0f%%" % (prediction.get("name"),
                                          100 * (prediction.get("confidence") or 0)))
    acc = snap.get("accuracy")
    if acc:
        domain = snap.get("domain") or "all"
        adapted = acc.get("adapted", {}).get(domain, {}).get("accuracy")
        source = acc.get("source", {}).get(domain, {}).get("accuracy")
        parts.append("acc[%s] adapted %s source %s" % (domain, _pct(adapted), _pct(source)))
    if snap.get("learner_paused"):
        parts.append("PAUSED: %s" % snap["learner_paused"])
    return " | ".join(parts)


class TerminalView:
    """Rewrites one line on a terminal; prints a line per snapshot otherwise (logs, CI)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, snap: Dict) -> None:
        line = status_line(snap)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def summary_text(snap: Dict) -> str:
    """Frames, latency per stage, memory, and accuracy per segment (adapted against source)."""
    lines = ["frames %d in %.0f s; learner steps %d, rollbacks %d" % (
        snap.get("counters", {}).get("frames", 0), snap.get("uptime_s", 0),
        snap.get("counters", {}).get("steps", 0), snap.get("counters", {}).get("rollbacks", 0))]
    for stage, lat in snap.get("latency_ms", {}).items():
        if lat.get("n"):
            lines.append("  %-18s p50 %8.2f  p95 %8.2f  p99 %8.2f ms  (n=%d)"
                         % (stage, lat["p50"], lat["p95"], lat["p99"], lat["n"]))
    if snap.get("cache_mb") is not None:
        lines.append("  cache %.2f MB (last step) against a budget of %s MB"
                     % (snap["cache_mb"], "-" if snap.get("budget_mb") is None
                        else "%.1f" % snap["budget_mb"]))
    acc = snap.get("accuracy", {})
    if acc:
        lines.append("  accuracy per segment:   adapted    source")
        for domain, row in acc.get("adapted", {}).items():
            src = acc.get("source", {}).get(domain, {}).get("accuracy")
            lines.append("    %-20s %8s  %8s   (%d frames)" % (
                domain, _pct(row["accuracy"]), _pct(src), row["frames"]))
    return "\n".join(lines)
