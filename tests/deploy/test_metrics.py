"""The Prometheus exporter, scraped over HTTP from a running daemon."""

import socket
import tempfile
import urllib.request

import pytest

from daemon.config import ConfigError
from daemon.service import Daemon

from ..daemon.running import Running, small_config, wait_for

prometheus_client = pytest.importorskip("prometheus_client")


@pytest.fixture(autouse=True)
def _private(monkeypatch):
    root = tempfile.mkdtemp(prefix="sgm", dir="/tmp")
    monkeypatch.setenv("RUNTIME_DIRECTORY", root + "/run")
    monkeypatch.setenv("STATE_DIRECTORY", root + "/state")


def _scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_a_scrape_shows_latency_histograms_cache_bytes_and_counters(tmp_path):
    video = "file://%s/out.avi" % tmp_path
    with Running(small_config("metrics.enabled=true", "metrics.port=0", "memory.budget_mb=4",
                              "telemetry.compare_source=true",
                              "output.video=[%s]" % video)) as daemon:
        wait_for(lambda: daemon.learner.steps >= 2 and "video" in daemon.telemetry.gauges)
        samples = _scrape(daemon.metrics.port)
    infer = [s for s in samples["surgeon_frame_latency_seconds_bucket"]
             if s.labels["stage"] == "infer" and s.labels["le"] == "+Inf"]
    assert infer and infer[0].value > 0
    assert samples["surgeon_adaptation_step_seconds_count"][0].value >= 2
    assert 0 < samples["surgeon_cache_bytes"][0].value <= 4 * 2**20
    assert samples["surgeon_step_peak_bytes"][0].value > 0
    assert samples["surgeon_memory_budget_bytes"][0].value == 4 * 2**20
    assert samples["surgeon_frames_total"][0].value > 0
    assert samples["surgeon_source_up"][0].value == 1
    models = {s.labels["model"]: s.value for s in samples["surgeon_served_confidence_ratio"]}
    assert set(models) == {"adapted", "source"} and all(0 < v <= 1 for v in models.values())
    assert 0 <= samples["surgeon_models_agreement_ratio"][0].value <= 1
    assert samples["surgeon_video_output_up"][0].labels["uri"] == video
    assert samples["surgeon_video_output_up"][0].value == 1
    assert samples["surgeon_video_frames_dropped_total"][0].value >= 0
    info = samples["surgeon_build_info"][0].labels
    assert info["arch"] == "cifar:resnet20" and info["method"] == "surgeon"
    assert not any(name.endswith("_created") for name in samples)
    # the standard process series a fleet's dashboards expect, beside the private ones
    assert samples["process_resident_memory_bytes"][0].value > 50 * 2**20
    assert samples["process_cpu_seconds_total"][0].value > 0
    assert samples["python_info"][0].labels["implementation"] == "CPython"


def test_the_exporter_binds_to_loopback_by_default():
    config = small_config()
    assert config.metrics.host == "127.0.0.1" and not config.metrics.enabled


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(small_config("metrics.enabled=true", "metrics.port=%d" % port))
        with pytest.raises(ConfigError, match="metrics: cannot listen"):
            daemon._start_endpoints()
        assert daemon.control._stop.is_set()   # the control sockets were closed again


def test_every_exported_series_is_documented():
    import re
    from pathlib import Path

    from daemon.metrics import _COUNTERS, _GAUGES

    text = (Path(__file__).parents[2] / "docs" / "DEPLOY.md").read_text()
    documented = set(re.findall(r"surgeon_[a-z_]+", text))
    for name in [n for n, _ in _COUNTERS.values()] + [n for n, _, _ in _GAUGES.values()] + [
            "surgeon_frame_latency_seconds", "surgeon_adaptation_step_seconds",
            "surgeon_frames_dropped_total", "surgeon_source_reconnects_total",
            "surgeon_frames_per_second", "surgeon_learner_paused", "surgeon_source_up",
            "surgeon_accuracy_ratio", "surgeon_build_info", "surgeon_served_confidence_ratio",
            "surgeon_models_agreement_ratio", "surgeon_video_output_up",
            "surgeon_video_frames_dropped_total"]:
        assert name in documented, name


def test_board_fields_reach_telemetry_the_status_line_and_prometheus(monkeypatch):
    from daemon.memory import MemoryProbe
    from daemon.tegrastats import parse_line

    sample = parse_line("RAM 2000/3964MB (lfb 100x4MB) SWAP 10/1982MB (cached 0MB) "
                        "CPU [12%,3%]@1428 EMC_FREQ 4%@1600 GR3D_FREQ 37%@921 GR3D2_FREQ 25%@921 "
                        "GPU@41.5C CPU@40C VDD_IN 3000/2900 VDD_IN 100/90")
    monkeypatch.setattr(MemoryProbe, "tegrastats_sample", property(lambda self: sample))
    with Running(small_config("metrics.enabled=true", "metrics.port=0")) as daemon:
        wait_for(lambda: daemon.telemetry.gauges.get("tegra") is not None)
        assert daemon.telemetry.gauges["tegra"]["gpu_loads"] == {"GR3D": 37, "GR3D2": 25}
        assert ", GPU 37%" in daemon.status_line()
        samples = _scrape(daemon.metrics.port)
    loads = {s.labels["engine"]: s.value for s in samples["surgeon_board_load_ratio"]}
    assert loads == {"GR3D": 0.37, "GR3D2": 0.25, "EMC": 0.04}
    rails = {s.labels["rail"]: s.value for s in samples["surgeon_board_power_watts"]}
    assert rails == {"VDD_IN": 3.0, "VDD_IN#2": 0.1}
    assert samples["surgeon_board_temperature_celsius"][0].value in (41.5, 40.0)
    assert samples["surgeon_board_largest_free_block_bytes"][0].value == 4 * 2 ** 20


def test_a_captured_step_off_the_gpu_runs_eagerly_and_says_why():
    """``cuda_graph`` on a CPU (NOTE [Captured step]): accepted, steps run eagerly, and the
    reason is in the telemetry; the counters are exported."""
    with Running(small_config("metrics.enabled=true", "metrics.port=0",
                              "learner.method_args.cuda_graph=true")) as daemon:
        wait_for(lambda: daemon.learner.steps >= 3)
        samples = _scrape(daemon.metrics.port)
        graph = daemon.telemetry.gauges["cuda_graph"]
    assert graph == {"captures": 0, "replays": 0, "eager_because": "not a CUDA device"}
    assert samples["surgeon_cuda_graph_replays_total"][0].value == 0
    assert samples["surgeon_cuda_graph_captures_total"][0].value == 0
