"""`surgeond plot` and `surgeonctl watch`'s trend: any run's telemetry, rotated files, restarts,
garbage lines, labelled or not."""

import json
import subprocess
import sys

import pytest

from daemon.control.watch import ASCII_BARS, sparkline
from daemon.plot import PlotError, Series, load_snapshots, plot_run

from .running import Running, small_config, wait_for

pytest.importorskip("matplotlib")


def _snap(t, uptime, steps, rollbacks=0, paused=None, drops=0, conf=0.6):
    return {"time": 1_800_000_000 + t, "uptime_s": uptime, "fps": 25.0,
            "counters": {"frames": int(uptime * 25), "steps": steps, "rollbacks": rollbacks},
            "learner_steps": steps, "learner_paused": paused, "loss": 0.3,
            "latency_ms": {"infer": {"p50": 5.0, "p99": 9.0, "n": 10},
                           "adapt": {"p50": 300.0, "p99": 500.0, "n": steps}},
            "cache_mb": 4.0, "budget_mb": 8.0, "memory_available_mb": 3000.0,
            "source": {"drops": drops}, "video": {"drops": 2 * drops},
            "served": {"adapted": {"confidence": conf, "entropy": 0.9},
                       "source": {"confidence": 0.5, "entropy": 1.2}, "agreement": 0.7}}


def _write(path, snaps, extra_lines=()):
    path.write_text("".join(json.dumps(s) + "\n" for s in snaps) + "".join(extra_lines))


@pytest.fixture
def two_runs(tmp_path):
    """An older run in the rotated file, a restart, a rollback and a pause in the newer one."""
    first = [_snap(t, t, t // 2) for t in range(0, 60, 2)]
    second = [_snap(70 + t, t, t // 2, rollbacks=int(t >= 20) + int(t >= 40),
                    paused="memory" if 24 <= t < 30 else None, drops=t)
              for t in range(0, 60, 2)]
    _write(tmp_path / "telemetry.jsonl.1", first, ["not json\n"])
    _write(tmp_path / "telemetry.jsonl", second, ["[1, 2]\n"])
    return tmp_path


def test_a_run_directory_with_rotation_and_a_restart(two_runs, tmp_path):
    result = plot_run(two_runs, tmp_path / "out" / "run.png")
    assert result["snapshots"] == 60 and result["skipped_lines"] == 2 and result["runs"] == 2
    assert result["rollbacks"] == 2 and result["pauses"] == 1
    assert (result["span"], result["unit"]) == (128, "seconds")
    assert (tmp_path / "out" / "run.png").stat().st_size > 20_000


def test_counters_restart_with_a_new_run(two_runs):
    series = Series(load_snapshots(two_runs)[0])
    assert series.run_starts == {30}
    steps = series.deltas("counters", "steps")
    assert steps[0] is None and steps[1] == 1 and steps[30] == 0      # the new run from zero
    assert series.rollbacks() == [series.x[40], series.x[50]]
    assert series.pauses() == [(series.x[42], series.x[45])]


def test_labelled_runs_plot_accuracy_per_interval(tmp_path):
    snaps = []
    for i in range(1, 11):
        snap = _snap(i, i, i)
        snap["domain"] = "clean" if i < 6 else "fog"
        right = 20 * min(i, 5) + 5 * max(0, i - 5)     # 100 % on clean, then 25 %
        snap["accuracy"] = {"adapted": {"all": {"accuracy": right / (20 * i), "frames": 20 * i}}}
        snaps.append(snap)
    _write(tmp_path / "telemetry.jsonl", snaps)
    xs, ys = Series(snaps).windowed_accuracy("adapted")
    assert ys == pytest.approx([100.0] * 5 + [25.0] * 5)
    assert Series(snaps).domains() == [(5.0, "fog")]
    assert plot_run(tmp_path / "telemetry.jsonl", tmp_path / "a.png")["snapshots"] == 10


def test_nothing_to_plot_is_a_clear_error(tmp_path):
    with pytest.raises(PlotError, match="no telemetry at"):
        plot_run(tmp_path, tmp_path / "x.png")
    _write(tmp_path / "telemetry.jsonl", [], ["garbage\n"])
    with pytest.raises(PlotError, match="no telemetry snapshots .1 lines skipped"):
        plot_run(tmp_path, tmp_path / "x.png")
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "plot", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "surgeond plot: no telemetry at" in done.stderr


def test_surgeond_plot_on_an_unlabelled_run_of_the_daemon(tmp_path):
    telemetry = tmp_path / "telemetry.jsonl"
    config = small_config("telemetry.jsonl=%s" % telemetry, "telemetry.compare_source=true",
                          uri="synthetic://?width=48&height=40&fps=100")
    with Running(config) as daemon:
        wait_for(lambda: daemon.learner.steps >= 2 and telemetry.exists()
                 and telemetry.read_text().count("\n") >= 3)
    snaps, _ = load_snapshots(tmp_path)
    served = snaps[-1]["served"]
    assert 0 < served["adapted"]["confidence"] <= 1 and 0 <= served["agreement"] <= 1
    assert served["source"]["frames"] == served["adapted"]["frames"] > 0
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "plot", str(tmp_path), "--out",
                           str(tmp_path / "run.png")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("wrote %s" % (tmp_path / "run.png"))
    assert (tmp_path / "run.png").stat().st_size > 20_000


def test_sparkline():
    assert sparkline([0.0, 0.5, 1.0, None, 2.0]) == "\u2581\u2585\u2588 \u2588"
    assert sparkline([0.0, 0.99], bars=ASCII_BARS) == "_@"
