"""`make demo`: the daemon on its embedded default, a live view, a summary and a PNG plot.

The replay source plays clean CIFAR-10 test images, then severity-5 corruptions; the learner
adapts ResNet-20 with SURGEON under a cache budget while the frozen source model scores the
same frames, so the view shows what adaptation buys. Ends by itself (the stream is finite).
``--save VIDEO`` records the stream with its overlays as well.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from .config import load_config
from .service import Daemon
from .view import TerminalView, summary_text

__all__ = ["DEMO_SETTINGS", "run_demo"]

DEMO_SETTINGS = [
    "source.uri=replay://cifar10?schedule=clean:600,gaussian_noise:1800,fog:1800,"
    "contrast:1800&severity=5&fps=60&seed=0",
    "telemetry.compare_source=true",
    "memory.budget_mb=8",
    "learner.batch_size=64",
    "learner.fresh_frames=32",
    "duration_s=170",   # 100 s of stream at 60 fps; a busy machine serves less of it
]


def run_demo(out_dir: Path, overrides: Optional[List[str]] = None,
             save: Optional[Path] = None) -> Dict:
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    telemetry = out_dir / "telemetry.jsonl"
    for old in [telemetry] + list(out_dir.glob("telemetry.jsonl.*")):
        old.unlink(missing_ok=True)    # the demo's own file: each run plots only itself
    # its own sockets and checkpoints, and always from the source weights, so that a second
    # run shows the same story and a service on this machine is left alone
    private = ["telemetry.jsonl=%s" % telemetry,
               "control.runtime_dir=%s" % (out_dir / "run"),
               "checkpoints.directory=%s" % (out_dir / "checkpoints"), "checkpoints.resume=none"]
    if save is not None:
        # one file for the whole demo: each CIFAR frame is a scene cut, ~100 MB in mp4v
        private += ["output.video=[file://%s]" % save.resolve(), "output.rotate_mb=null"]
    config = load_config(None, DEMO_SETTINGS + private + list(overrides or []))
    print("watch it from another shell: surgeonctl --endpoint ipc://%s/control.sock watch"
          % (out_dir / "run"))
    view = TerminalView()
    final = Daemon(config, on_snapshot=view).run()
    view.close()
    print(summary_text(final))
    (out_dir / "summary.json").write_text(json.dumps(final, indent=1))
    print("summary: %s\nplot:    %s" % (out_dir / "summary.json", _plot(out_dir)))
    if save is not None:
        print("video:   %s" % save.resolve())
    return final


def _plot(out_dir: Path) -> str:
    from .plot import PlotError, plot_run

    try:
        return plot_run(out_dir, out_dir / "demo.png", "surgeond demo")["out"]
    except PlotError as exc:
        return "not drawn (%s)" % exc
