import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from daemon.config import ConfigError
from daemon.control.client import ControlClient
from daemon.learner import COLLAPSE_STEPS, RECOVER_STEPS
from daemon.memory import MB
from daemon.service import Daemon
from surgeon_core.allocator import allocator_library
from surgeon_core.methods.base import StepResult

from .running import REPLAY, Running as _Running, small_config, wait_for as _wait


def _config(*extra):
    return small_config(*extra)


def _finite(model):
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


@pytest.mark.parametrize("uri", [REPLAY, "synthetic://?width=48&height=40&fps=100"])
def test_surgeond_serves_then_stops_cleanly_on_sigterm(tmp_path, uri):
    predictions = tmp_path / "pred.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--set", "source.uri=" + uri,
         "--set", "output.predictions=%s" % predictions, "--set", "learner.batch_size=16",
         "--set", "learner.fresh_frames=8", "--set", "threads=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait(lambda: predictions.exists() and len(predictions.read_text().splitlines()) > 50,
              timeout=90)
        client = ControlClient("ipc://%s/control.sock" % os.environ["RUNTIME_DIRECTORY"])
        _wait(lambda: client.call("status")["learner"]["steps"] >= 1)
        status = client.call("status")
    finally:
        stop_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # run again under tcmalloc where installed, in the same process (systemd watches its pid)
    picked = "tcmalloc" if allocator_library("auto") else "glibc"
    assert status["allocator"] == picked + ", trim" and status["pid"] == proc.pid, status
    assert time.monotonic() - stop_at < 45   # the unit's TimeoutStopSec
    assert "frames" in out and "infer" in out
    lines = predictions.read_text().splitlines()
    assert len(lines) > 50 and '"class"' in lines[-1]
    saved = list(Path(os.environ["STATE_DIRECTORY"], "checkpoints").glob("auto-*.pt"))
    assert len(saved) == 1 and "on the way out" in err   # SIGTERM saves a checkpoint


def test_injected_nan_rolls_back_and_serving_never_keeps_it():
    with _Running(_config()) as daemon:
        _wait(lambda: daemon.learner.steps >= 2)
        with torch.no_grad():
            next(daemon.method.model.parameters()).fill_(float("nan"))
        _wait(lambda: daemon.telemetry.counters["rollbacks"] >= 1)
        steps = daemon.learner.steps
        _wait(lambda: daemon.learner.steps >= steps + 2)
        assert _finite(daemon.method.model) and _finite(daemon.serving.model)
    assert "non-finite" in daemon.telemetry.gauges["last_rollback"]


def test_a_lower_budget_is_honoured_within_a_few_steps():
    with _Running(_config("memory.budget_mb=4")) as daemon:
        _wait(lambda: daemon.learner.steps >= 3)
        assert daemon.telemetry.gauges["cache_mb"] <= 4.0
        daemon.learner.set_budget_cap(0.8)
        start = daemon.learner.steps
        _wait(lambda: daemon.learner.steps >= start + 3)
        assert daemon.telemetry.gauges["cache_mb"] <= 0.8
        assert daemon.telemetry.gauges["budget_mb"] == pytest.approx(0.8)


def test_no_memory_pauses_the_learner_and_says_why():
    config = _config("memory.reserve_mb=100000000")
    with _Running(config) as daemon:
        _wait(lambda: daemon.learner.paused_reason is not None)
        time.sleep(0.3)
        assert daemon.learner.steps == 0 and daemon.frames > 0
    assert "reserve" in daemon.learner.paused_reason


def test_out_of_memory_halves_the_batch_then_pauses(monkeypatch):
    daemon = Daemon(_config())
    tegra_oom = RuntimeError("NVML_SUCCESS == r INTERNAL ASSERT FAILED at CUDACachingAllocator")

    def oom(x):
        raise tegra_oom

    monkeypatch.setattr(daemon.method, "step", oom)
    learner = daemon.learner
    for _ in range(40):
        learner.buffer.push(torch.zeros(3, 32, 32, dtype=torch.uint8))
    learner._step()
    learner._step()
    assert learner.batch_size == 4 and daemon.telemetry.counters["out_of_memory"] == 2
    assert learner.paused_reason is None
    learner._step()                       # at the minimum batch: pause, with the reason
    assert "out of memory" in learner.paused_reason and not learner._ready()


def test_collapse_rolls_back_to_the_last_good_state():
    daemon = Daemon(_config())
    learner = daemon.learner
    confident = torch.full((16, 10), -20.0)
    confident[:, 3] = 20.0
    result = SimpleNamespace(logits=confident)
    verdicts = [learner._healthy(result) for _ in range(COLLAPSE_STEPS)]
    assert verdicts == [True] * (COLLAPSE_STEPS - 1) + [False]
    assert daemon.telemetry.counters["rollbacks"] == 1
    varied = SimpleNamespace(logits=torch.randn(16, 10))
    assert all(learner._healthy(varied) for _ in range(2 * COLLAPSE_STEPS))


def test_methods_that_need_batch_statistics_are_refused():
    with pytest.raises(ConfigError, match="per-frame serving"):
        Daemon(_config("learner.method=tent"))
    with pytest.raises(ConfigError, match="learner.method"):
        Daemon(_config("learner.method=nonsense"))


def test_budget_is_reported_in_megabytes():
    daemon = Daemon(_config("memory.budget_mb=3"))
    budget, why, peak = daemon._budget()
    assert budget == 3 * MB and "cap" in why
    assert peak > budget   # the cap bounds the cache; the step's peak gets the memory share


def test_the_memory_share_bounds_the_steps_peak_and_an_oom_halves_it(monkeypatch):
    """NOTE [Peak budget]: the cap bounds the cache, the memory share the whole step."""
    daemon = Daemon(_config("memory.budget_mb=3"))
    learner, engine = daemon.learner, daemon.learner.method.engine
    learner._refresh_budget()
    peak = engine.peak_budget_bytes
    assert engine.budget_bytes == 3 * MB and peak > 3 * MB
    assert daemon.telemetry.snapshot()["peak_budget_mb"] == pytest.approx(peak / MB)
    learner._out_of_memory(RuntimeError("CUDA out of memory"))
    learner._refresh_budget()
    assert engine.peak_budget_bytes <= 3 * MB // 2 and engine.budget_bytes <= 3 * MB // 2


def test_a_budget_that_trains_nothing_shrinks_the_batch(monkeypatch):
    daemon = Daemon(_config("memory.budget_mb=8"))
    learner = daemon.learner
    learner._refresh_budget()
    nothing_trained = StepResult(logits=torch.randn(16, 10), loss=0.1, cache_bytes=1000,
                                 paper_bytes=0, mean_keep=None, overall_keep=0.0,
                                 updated=False, selected=0, seconds=0.01)
    monkeypatch.setattr(daemon.method, "step", lambda x: nothing_trained)
    for _ in range(40):
        learner.buffer.push(torch.zeros(3, 32, 32, dtype=torch.uint8))
    learner._step()
    assert learner.batch_size == 8 and daemon.telemetry.counters["batch_shrinks"] == 1
    nothing_prunable = SimpleNamespace(mean_keep=None, overall_keep=None)   # quantised x_hat
    assert not learner._starved(nothing_prunable)


def test_after_clean_steps_the_batch_and_budget_grow_back(monkeypatch):
    daemon = Daemon(_config("memory.budget_mb=8"))
    learner = daemon.learner
    learner._refresh_budget()
    for _ in range(40):
        learner.buffer.push(torch.zeros(3, 32, 32, dtype=torch.uint8))
    monkeypatch.setattr(daemon.method, "step", lambda x: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory")))
    learner._step()
    assert learner.batch_size == 8 and learner._oom_cap == 4 * MB
    learner._last_poll = -float("inf")
    learner._refresh_budget()
    assert learner.budget_bytes == 4 * MB                # the OOM halved the budget
    healthy = StepResult(logits=torch.randn(8, 10), loss=0.1, cache_bytes=1000,
                         paper_bytes=0, mean_keep=0.3, overall_keep=0.2, updated=True,
                         selected=8, seconds=0.01)
    monkeypatch.setattr(daemon.method, "step", lambda x: healthy)
    for _ in range(RECOVER_STEPS):
        learner._step()
    assert learner.batch_size == 16 and learner._oom_cap is None
    learner._refresh_budget()
    assert learner.budget_bytes == 8 * MB
