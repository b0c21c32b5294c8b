from daemon.bench import _budget_check
from daemon.memory import MB


def test_budget_check_counts_overruns_and_steps_to_honour_a_cut():
    log = [(1, 7 * MB, 8 * MB), (2, 7.9 * MB, 8 * MB), (3, 7.9 * MB, 8 * MB),   # cut after 3
           (4, 2.5 * MB, 3 * MB), (5, 2.9 * MB, 3 * MB)]
    check = _budget_check(log, cut_step=3)
    assert check["steps_over_budget"] == 0 and check["steps_to_honour_cut"] == 1
    assert check["cache_mb_after_cut"] == [2.5, 2.9]
    late = log[:3] + [(4, 7.9 * MB, 3 * MB), (5, 2.9 * MB, 3 * MB)]
    check = _budget_check(late, cut_step=3)
    assert check["steps_over_budget"] == 1 and check["steps_to_honour_cut"] == 2
    assert check["max_cache_over_budget"] > 2.6


def test_control_bench_answers_every_flooded_request(tmp_path):
    from daemon.bench_control import run_control_bench

    result = run_control_bench(tmp_path / "control.json", fps=30, quiet_s=1.5, flood_s=3,
                               overrides=["threads=1"])
    flood = result["flood"]
    assert flood["replies"] == flood["sent"] > 100 and flood["error_replies"] == flood["replies"]
    assert result["quiet"]["frames"] > 0 and flood["frames"] > 0
    assert result["ping_ms_during_flood"]["n"] > 0 and result["warning_lines_logged"] <= 2
    assert (tmp_path / "control.json").is_file()


def test_frames_before_the_first_step_are_neither_on_nor_off():
    from daemon.service import Daemon

    from .running import small_config

    daemon = Daemon(small_config())
    assert daemon._serving_split() == "infer_learner_starting"
    daemon.learner.steps = 1
    assert daemon._serving_split() == "infer_learner_on"
    daemon.learner.pause(True)
    assert daemon._serving_split() == "infer_learner_off"


def test_bench_reports_every_percentile_ratio(tmp_path):
    from daemon.bench import finish

    result = finish(tmp_path / "r.json", {}, "p99_ratio_on_over_off",
                    {"p50": 2.0, "p95": 3.0, "p99": 6.0}, {"p50": 1.0, "p95": 2.0, "p99": 3.0})
    assert result["p99_ratio_on_over_off"] == 2.0
    assert result["ratio_on_over_off_all"] == {"p50": 2.0, "p95": 1.5, "p99": 2.0}


def test_the_serving_bench_shows_its_progress(tmp_path):
    import io

    from daemon.bench import run_bench

    lines = io.StringIO()
    result = run_bench(tmp_path / "bench.json", fps=30, off_s=1.5, on_s=2.5, low_s=1.5,
                       overrides=["telemetry.interval_s=0.25"], progress_every_s=1.0,
                       progress=lines)
    shown = lines.getvalue().splitlines()
    assert len(shown) >= 3 and all(line.startswith("surgeond bench: ") for line in shown)
    assert any("/6 s, learner off (serving alone)" in line for line in shown), shown
    assert result["frames"] > 0 and (tmp_path / "bench.json").exists()
