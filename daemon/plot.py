"""`surgeond plot`: one figure of a run from its telemetry JSONL, any run, not only the demo.

Panels over wall time: served accuracy per interval (labelled streams) or mean confidence and
entropy (any stream), adapted against the frozen source model; latency p50/p99 per stage;
cache, step peak and their budgets against available memory; fps and drops; learner steps
and loss.
Rollbacks are red lines and learner pauses grey bands on every panel. Rotated files
(``telemetry.jsonl.N``) are read oldest first; lines that are not JSON objects are skipped and
counted. Several runs in one file (the uptime starts again) are kept apart.
"""

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["load_snapshots", "plot_run", "plot_snapshots", "telemetry_files", "PlotError",
           "Series"]

STAGES = ("capture", "preprocess", "infer", "adapt")
MIN_FRAMES_PER_POINT = 20


class PlotError(ValueError):
    """Nothing to plot, or no way to plot it; the message says which."""


def telemetry_files(path: Path) -> List[Path]:
    """A run directory's telemetry.jsonl, or the given file, with its rotated siblings oldest
    first (NAME.5 ... NAME.1, NAME)."""
    path = Path(path)
    if path.is_dir():
        path = path / "telemetry.jsonl"
    rotated = sorted(path.parent.glob(path.name + ".*"),
                     key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    files = [p for p in rotated if p.suffix[1:].isdigit()] + ([path] if path.exists() else [])
    if not files:
        raise PlotError("no telemetry at %s (set telemetry.jsonl in the daemon's config)" % path)
    return files


def load_snapshots(path: Path) -> Tuple[List[Dict], int]:
    """(snapshots in file order, lines skipped)."""
    snaps, skipped = [], 0
    for file in telemetry_files(path):
        with open(file, errors="replace") as handle:
            for line in handle:
                try:
                    snap = json.loads(line)
                except ValueError:
                    skipped += 1
                    continue
                if isinstance(snap, dict) and isinstance(snap.get("time"), (int, float)):
                    snaps.append(snap)
                else:
                    skipped += 1
    if not snaps:
        raise PlotError("%s holds no telemetry snapshots (%d lines skipped)" % (path, skipped))
    return snaps, skipped


def _get(snap: Dict, *keys):
    for key in keys:
        if not isinstance(snap, dict):
            return None
        snap = snap.get(key)
    return snap if isinstance(snap, (int, float)) and not isinstance(snap, bool) else None


class Series:
    """The snapshots as aligned columns; x in the unit that suits the span."""

    def __init__(self, snaps: List[Dict]):
        self.snaps = snaps
        start = snaps[0]["time"]
        span = snaps[-1]["time"] - start
        self.unit, scale = (("hours", 3600.0) if span > 3 * 3600 else
                            ("minutes", 60.0) if span > 600 else ("seconds", 1.0))
        self.x = [(s["time"] - start) / scale for s in snaps]
        uptimes = [_get(s, "uptime_s") or 0 for s in snaps]
        self.run_starts = {i for i in range(1, len(snaps)) if uptimes[i] < uptimes[i - 1]}

    def column(self, *keys) -> List[Optional[float]]:
        return [_get(s, *keys) for s in self.snaps]

    def deltas(self, *keys) -> List[Optional[float]]:
        """Per-interval increase of a cumulative counter; a new run counts from zero."""
        out: List[Optional[float]] = []
        last = None
        for i, value in enumerate(self.column(*keys)):
            if value is None:
                out.append(None)
                continue
            if i in self.run_starts or (last is not None and value < last):
                out.append(value)
            else:
                out.append(None if last is None else value - last)
            last = value
        return out

    def windowed_accuracy(self, model: str) -> Tuple[List[float], List[float]]:
        """Accuracy of the frames labelled since the last point, from cumulative counts."""
        xs, ys, last = [], [], (0, 0.0)
        for i, snap in enumerate(self.snaps):
            row = ((snap.get("accuracy") or {}).get(model) or {}).get("all")
            if not row:
                continue
            seen, right = row["frames"], row["accuracy"] * row["frames"]
            if seen < last[0] or i in self.run_starts:
                last = (0, 0.0)
            if seen - last[0] >= MIN_FRAMES_PER_POINT:
                xs.append(self.x[i])
                ys.append(100 * (right - last[1]) / (seen - last[0]))
                last = (seen, right)
        return xs, ys

    def rollbacks(self) -> List[float]:
        return [x for x, d in zip(self.x, self.deltas("counters", "rollbacks")) if d]

    def pauses(self) -> List[Tuple[float, float]]:
        spans, begin = [], None
        for x, snap in zip(self.x, self.snaps):
            paused = bool(snap.get("learner_paused"))
            if paused and begin is None:
                begin = x
            elif not paused and begin is not None:
                spans.append((begin, x))
                begin = None
        if begin is not None:
            spans.append((begin, self.x[-1]))
        return spans

    def domains(self) -> List[Tuple[float, str]]:
        marks = []
        for i in range(1, len(self.snaps)):
            domain = self.snaps[i].get("domain")
            if domain and domain != self.snaps[i - 1].get("domain"):
                marks.append((self.x[i], str(domain)))
        return marks


def _drop_none(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _quality(ax, series: Series) -> None:
    labelled = any(s.get("accuracy") for s in series.snaps)
    if labelled:
        for model, style in (("adapted", "-"), ("source", "--")):
            ax.plot(*series.windowed_accuracy(model), style, label="%s accuracy" % model)
        ax.set_ylabel("accuracy %\n(per interval)")
        ax.set_ylim(0, 100)
        for x, name in series.domains():
            ax.axvline(x, color="grey", alpha=0.4)
            ax.annotate(name, (x, 3), fontsize=7, rotation=90)
    else:
        for model, style in (("adapted", "-"), ("source", "--")):
            ax.plot(*_drop_none(series.x, series.column("served", model, "confidence")), style,
                    label="%s confidence" % model)
        ax.set_ylabel("mean confidence")
        ax.set_ylim(0, 1.02)
        twin = ax.twinx()
        for model, style in (("adapted", ":"), ("source", "-.")):
            twin.plot(*_drop_none(series.x, series.column("served", model, "entropy")), style,
                      color="tab:purple", alpha=0.7, label="%s entropy" % model)
        twin.set_ylabel("mean entropy (nats)")
        twin.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)


def _latency(ax, series: Series) -> None:
    for stage in STAGES:
        for key, style in (("p50", "-"), ("p99", ":")):
            xs, ys = _drop_none(series.x, series.column("latency_ms", stage, key))
            if ys:
                ax.plot(xs, ys, style, label="%s %s" % (stage, key))
    ax.set_yscale("log")
    ax.set_ylabel("latency ms")
    ax.legend(loc="upper left", fontsize=6, ncol=4)


def _memory(ax, series: Series) -> None:
    drawn = []
    for key, style, label in (("cache_mb", "-", "cache"), ("budget_mb", "--", "cache budget"),
                              ("peak_mb", "-", "step peak"),
                              ("peak_budget_mb", "--", "peak budget")):
        xs, ys = _drop_none(series.x, series.column(key))
        if ys:
            ax.plot(xs, ys, style, label=label)
            drawn += [y for y in ys if y > 0]
    if drawn and max(drawn) > 20 * min(drawn):
        ax.set_yscale("log")      # an 8 MB cache beside a peak budget of gigabytes
    ax.set_ylabel("MB")
    ax.legend(loc="upper left", fontsize=7)
    _twin_line(ax, series, "memory_available_mb", "tab:grey", "available", "available MB")


def _twin_line(ax, series: Series, key: str, colour: str, label: str, ylabel: str) -> None:
    """One more series on a right-hand axis of its own, when the run has it."""
    xs, ys = _drop_none(series.x, series.column(key))
    if ys:
        twin = ax.twinx()
        twin.plot(xs, ys, color=colour, alpha=0.6, label=label)
        twin.set_ylabel(ylabel)
        twin.legend(loc="upper right", fontsize=7)


def _throughput(ax, series: Series) -> None:
    ax.plot(*_drop_none(series.x, series.column("fps")), label="fps")
    ax.set_ylabel("fps")
    ax.legend(loc="upper left", fontsize=7)
    twin = ax.twinx()
    for keys, label in ((("source", "drops"), "source drops"),
                        (("video", "drops"), "output drops")):
        xs, ys = _drop_none(series.x, series.deltas(*keys))
        twin.step(xs, ys, where="post", alpha=0.7, label=label)
    twin.set_ylabel("drops per interval")
    twin.legend(loc="upper right", fontsize=7)


def _learner(ax, series: Series) -> None:
    ax.plot(*_drop_none(series.x, series.column("learner_steps")), color="tab:green",
            label="learner steps (total)")
    ax.set_ylabel("steps")
    ax.legend(loc="upper left", fontsize=7)
    _twin_line(ax, series, "loss", "tab:brown", "loss", "loss")


def _marks(axes, series: Series) -> None:
    for ax in axes:
        for begin, end in series.pauses():
            ax.axvspan(begin, end, color="grey", alpha=0.15, lw=0)
        for x in series.rollbacks():
            ax.axvline(x, color="tab:red", ls="--", lw=0.8)
        for i in sorted(series.run_starts):
            ax.axvline(series.x[i], color="black", lw=1.2)


def plot_run(path: Path, out: Path, title: Optional[str] = None) -> Dict:
    """The PNG of a telemetry file (or run directory); returns what went into it."""
    snaps, skipped = load_snapshots(path)
    return dict(plot_snapshots(snaps, out, title or str(path)), skipped_lines=skipped)


def plot_snapshots(snaps: List[Dict], out: Path, title: str) -> Dict:
    """Writes the PNG of ``snaps`` (in time order)."""
    if not snaps:
        raise PlotError("no telemetry snapshots to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install matplotlib (or the 'bench' "
                        "extra)") from None
    series = Series(snaps)
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 2, 2, 2]})
    for draw, ax in zip((_quality, _latency, _memory, _throughput, _learner), axes):
        draw(ax, series)
    _marks(axes, series)
    axes[-1].set_xlabel("%s since %s (red: rollback, grey: learner paused, black: restart)"
                        % (series.unit, _clock(snaps[0]["time"])))
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"out": str(out), "snapshots": len(snaps), "runs": 1 + len(series.run_starts),
            "rollbacks": len(series.rollbacks()), "pauses": len(series.pauses()),
            "span": round(series.x[-1], 2), "unit": series.unit}


def _clock(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
