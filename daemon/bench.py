"""`surgeond bench`: serving latency with the learner off and on, and a mid-run budget cut, in
one daemon run on the replay stream (results in BENCHMARKS.md with this command).

Phases: learner running at the configured budget, learner paused (serving alone), learner
running again after the budget is lowered. The paused phase comes second so that start-up
(first allocations, the source's first chunks) does not land in it. Serving latency
percentiles are split by whether the learner was running when the frame was served, and frames
before the learner's first step are counted apart (start-up is neither on nor off); every
step's measured cache is checked against the budget in force when it was planned.
"""

import json
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from .config import load_config
from .memory import MB
from .service import Daemon

__all__ = ["run_bench", "finish"]

STREAM = ("replay://cifar10?schedule=clean:500,gaussian_noise:100000&severity=5&fps=%d&seed=0")


def _phases(daemon: Daemon, off_s: float, on_s: float, low_mb: float, marks: Dict) -> None:
    learner = daemon.learner
    marks["phase"] = "learner on"
    time.sleep(on_s)
    learner.pause(True)
    marks["phase"] = "learner off (serving alone)"
    time.sleep(off_s)
    marks["cut_at_step"] = learner.steps
    learner.set_budget_cap(low_mb)
    learner.pause(False)
    marks["phase"] = "learner on, budget cut to %g MB" % low_mb


def _progress(total_s: float, marks: Dict, every_s: float, stream: TextIO):
    """A line on ``stream`` every ``every_s`` seconds of the run: where it is, and how far."""
    started, shown = time.monotonic(), [0.0]

    def show(snap: Dict) -> None:
        elapsed = time.monotonic() - started
        if elapsed - shown[0] < every_s:
            return
        shown[0] = elapsed
        counters = snap.get("counters", {})
        stream.write("surgeond bench: %3.0f/%.0f s, %s, %d frames, %d steps\n" % (
            elapsed, total_s, marks.get("phase", "starting"), counters.get("frames", 0),
            counters.get("steps", 0)))
        stream.flush()
    return show


def _budget_check(step_log: List[tuple], cut_step: int) -> Dict:
    over = [(s, c, b) for s, c, b in step_log if b is not None and c > b]
    after = [(s, c, b) for s, c, b in step_log if s > cut_step]
    settle = next((s - cut_step for s, c, b in after if b is not None and c <= b
                   and b == after[-1][2]), None)
    return {"steps": len(step_log), "steps_over_budget": len(over),
            "max_cache_over_budget": max((c / b for _, c, b in step_log if b), default=None),
            "steps_to_honour_cut": settle,
            "cache_mb_before_cut": [round(c / MB, 2) for s, c, _ in step_log
                                    if cut_step - 3 < s <= cut_step],
            "cache_mb_after_cut": [round(c / MB, 2) for s, c, _ in after[:5]]}


def run_bench(out: Path, fps: int = 60, off_s: float = 30, on_s: float = 45,
              low_s: float = 30, budget_mb: float = 8, low_mb: float = 3,
              overrides: Optional[List[str]] = None, progress_every_s: float = 5.0,
              progress: TextIO = sys.stderr) -> Dict:
    config = load_config(None, ["source.uri=" + STREAM % fps, "memory.budget_mb=%g" % budget_mb,
                                "duration_s=%g" % (off_s + on_s + low_s), "memory.poll_s=1",
                                "control.enabled=false", "checkpoints.resume=none",
                                "checkpoints.directory=%s" % (out.parent / "checkpoints"),
                                "checkpoints.on_exit=false"]
                         + list(overrides or []))
    marks: Dict = {}
    daemon = Daemon(config, on_snapshot=_progress(off_s + on_s + low_s, marks, progress_every_s,
                                                  progress))
    control = threading.Thread(target=_phases, args=(daemon, off_s, on_s, low_mb, marks),
                               daemon=True)
    control.start()
    final = daemon.run()
    control.join(1)
    lat = final["latency_ms"]
    result = {"fps_requested": fps, "frames": final["counters"].get("frames", 0),
              "drops": final.get("source", {}).get("drops"),
              "serving_ms_learner_off": lat["infer_learner_off"],
              "serving_ms_learner_on": lat["infer_learner_on"],
              "serving_ms_learner_starting": lat["infer_learner_starting"],
              "adapt_step_ms": lat["adapt"], "budget_mb": budget_mb, "low_budget_mb": low_mb,
              "budget": _budget_check(list(daemon.learner.step_log),
                                      marks.get("cut_at_step", 0)),
              "device": str(daemon.device), "threads": config.threads}
    return finish(out, result, "p99_ratio_on_over_off", result["serving_ms_learner_on"],
                  result["serving_ms_learner_off"])


def finish(out: Path, result: Dict, name: str, over: Dict, under: Dict) -> Dict:
    """Add ``name`` = p99 of ``over`` / p99 of ``under``, and the p50/p95/p99 ratios under
    ``name`` with ``_all`` (when both exist); write ``out``."""
    ratios = {q: round(over[q] / under[q], 2) for q in ("p50", "p95", "p99")
              if over.get(q) and under.get(q)}
    if "p99" in ratios:
        result[name] = ratios["p99"]
        result[name.replace("p99_", "") + "_all"] = ratios
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result
