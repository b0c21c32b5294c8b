"""`make demo`: the daemon on its embedded default, a live view, a summary and a PNG plot.

The replay source plays clean CIFAR-10 test images, then severity-5 corruptions; the learner
adapts ResNet-20 with SURGEON under a cache budget while the frozen source model scores the
same frames, so the view shows what adaptation buys. Ends by itself (the stream is finite).
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from .config import load_config
from .service import Daemon
from .view import TerminalView, summary_text

__all__ = ["DEMO_SETTINGS", "run_demo", "save_demo_plot"]

DEMO_SETTINGS = [
    "source.uri=replay://cifar10?schedule=clean:600,gaussian_noise:1800,fog:1800,"
    "contrast:1800&severity=5&fps=60&seed=0",
    "telemetry.compare_source=true",
    "memory.budget_mb=8",
    "learner.batch_size=64",
    "learner.fresh_frames=32",
    "duration_s=170",   # 100 s of stream at 60 fps; a busy machine serves less of it
]


def run_demo(out_dir: Path, overrides: Optional[List[str]] = None) -> Dict:
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # its own sockets and checkpoints, and always from the source weights, so that a second
    # run shows the same story and a service on this machine is left alone
    private = ["telemetry.jsonl=%s" % (out_dir / "telemetry.jsonl"),
               "control.runtime_dir=%s" % (out_dir / "run"),
               "checkpoints.directory=%s" % (out_dir / "checkpoints"), "checkpoints.resume=none"]
    config = load_config(None, DEMO_SETTINGS + private + list(overrides or []))
    print("watch it from another shell: surgeonctl --endpoint ipc://%s/control.sock watch"
          % (out_dir / "run"))
    view, history = TerminalView(), []

    def on_snapshot(snap):
        history.append(snap)
        view(snap)

    final = Daemon(config, on_snapshot=on_snapshot).run()
    view.close()
    history.append(final)
    print(summary_text(final))
    (out_dir / "summary.json").write_text(json.dumps(final, indent=1))
    plot = save_demo_plot(history, out_dir / "demo.png")
    print("summary: %s\nplot:    %s" % (out_dir / "summary.json", plot))
    return final


def _windowed_accuracy(history: List[Dict], model: str):
    times, values, last = [], [], (0, 0.0)
    for snap in history:
        row = snap.get("accuracy", {}).get(model, {}).get("all")
        if not row:
            continue
        seen, right = row["frames"], row["accuracy"] * row["frames"]
        if seen - last[0] >= 20:
            times.append(snap["uptime_s"])
            values.append(100 * (right - last[1]) / (seen - last[0]))
            last = (seen, right)
    return times, values


def save_demo_plot(history: List[Dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for model, style in (("adapted", "-"), ("source", "--")):
        times, values = _windowed_accuracy(history, model)
        top.plot(times, values, style, label=model)
    for snap_a, snap_b in zip(history, history[1:]):
        if snap_a.get("domain") != snap_b.get("domain") and snap_b.get("domain"):
            top.axvline(snap_b["uptime_s"], color="grey", alpha=0.4)
            top.annotate(snap_b["domain"], (snap_b["uptime_s"], 5), fontsize=7, rotation=90)
    top.set_ylabel("online accuracy, % (per interval)")
    top.set_ylim(0, 100)
    top.legend()
    times = [s["uptime_s"] for s in history]
    bottom.plot(times, [s.get("cache_mb") or 0 for s in history], label="measured cache MB")
    bottom.plot(times, [s.get("budget_mb") or 0 for s in history], "--", label="budget MB")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("MB")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
