"""The optional Prometheus exporter (extra ``metrics``; off unless ``metrics.enabled``).

Names follow Prometheus conventions (../shared/research/jetson.md section 8): one ``surgeon_``
prefix, base units (seconds, bytes, ratios 0-1), ``_total`` on counters, low-cardinality labels.
Latencies are real histograms, fed on every frame and step, so that a fleet's distributions can
be summed; everything else is read from the telemetry at scrape time. The server binds to
loopback unless ``metrics.host`` says otherwise, and runs on its own registry and thread.
"""

import logging
from typing import Dict, Iterator, Optional

__all__ = ["MetricsExporter", "LATENCY_BUCKETS"]

log = logging.getLogger("surgeond.metrics")
# Xavier NX: a few ms per frame, up to seconds per adaptation step
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTERS = {   # telemetry counter -> (metric name, help)
    "frames": ("surgeon_frames_total", "Frames served."),
    "steps": ("surgeon_adaptation_steps_total", "Adaptation steps taken."),
    "updates": ("surgeon_adaptation_updates_total", "Steps that updated the weights."),
    "rollbacks": ("surgeon_rollbacks_total", "Rollbacks after NaN weights or a collapse."),
    "out_of_memory": ("surgeon_oom_events_total", "Out-of-memory errors in the learner."),
    "batch_shrinks": ("surgeon_batch_shrinks_total", "Learner batch halvings."),
    "bad_frames": ("surgeon_bad_frames_total", "Frames that could not be preprocessed."),
    "control_requests": ("surgeon_control_requests_total", "Control requests received."),
    "control_errors": ("surgeon_control_errors_total", "Control requests answered with an error."),
    "control_faults": ("surgeon_control_faults_total", "Unexpected errors in the control thread."),
    "control_restarts": ("surgeon_control_restarts_total", "Control threads started again."),
    "learner_faults": ("surgeon_learner_faults_total", "Learner loop restarts after a fault."),
    "telemetry_faults": ("surgeon_telemetry_faults_total", "Failed telemetry rounds."),
}
_GAUGES = {     # telemetry gauge -> (metric name, help, scale)
    "cache_mb": ("surgeon_cache_bytes", "Activation cache measured at the last step.", 2**20),
    "peak_mb": ("surgeon_step_peak_bytes", "Memory the last step added at its peak.", 2**20),
    "resident_peak_mb": ("surgeon_step_resident_peak_bytes",
                         "Process resident peak during the last step (CPU).", 2**20),
    "reserved_mb": ("surgeon_cuda_reserved_peak_bytes",
                    "CUDA caching allocator's peak reservation in the last step.", 2**20),
    "budget_mb": ("surgeon_memory_budget_bytes", "Cache budget in force.", 2**20),
    "peak_budget_mb": ("surgeon_step_peak_budget_bytes",
                       "Budget on one step's peak (NOTE [Peak budget]).", 2**20),
    "micro_batches": ("surgeon_learner_micro_batches",
                      "Micro-batches the last step ran in to fit the budget.", 1),
    "memory_available_mb": ("surgeon_memory_available_bytes", "Available memory.", 2**20),
    "process_rss_mb": ("surgeon_process_resident_bytes", "Resident set size.", 2**20),
    "overall_keep": ("surgeon_keep_ratio", "Kept share of prunable activations.", 1),
    "loss": ("surgeon_adaptation_loss", "Loss of the last step.", 1),
    "batch_size": ("surgeon_learner_batch_size", "Learner batch size.", 1),
}


class MetricsExporter:
    """Args: config (MetricsConfig), telemetry, info (labels of surgeon_build_info)."""

    def __init__(self, config, telemetry, info: Dict[str, str]):
        try:
            import prometheus_client
        except ImportError:
            from .config import ConfigError

            raise ConfigError("metrics.enabled needs prometheus-client: pip install "
                              "'surgeon[metrics]'") from None
        self._prom = prometheus_client
        if hasattr(prometheus_client, "disable_created_metrics"):
            prometheus_client.disable_created_metrics()   # fewer series on a small device
        self.config, self.telemetry, self.info = config, telemetry, info
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._latency = prometheus_client.Histogram(
            "surgeon_frame_latency_seconds", "Per-frame latency by stage.", ["stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self._step = prometheus_client.Histogram(
            "surgeon_adaptation_step_seconds", "Duration of one adaptation step.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_TelemetryCollector(self))
        # the standard process_* and python_info series, which a private registry lacks
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        self._server = None
        self.port: Optional[int] = None
        telemetry.observe(self._observe)

    def _observe(self, stage: str, seconds: float) -> None:
        if stage == "adapt":
            self._step.observe(seconds)
        elif stage in ("capture", "preprocess", "infer"):
            self._latency.labels(stage).observe(seconds)

    def start(self) -> "MetricsExporter":
        started = self._prom.start_http_server(self.config.port, addr=self.config.host,
                                               registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None
        self.port = self._server.server_port if self._server is not None else self.config.port
        log.info("Prometheus metrics on http://%s:%d/metrics", self.config.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _served(served: Dict) -> Iterator:
    from prometheus_client.core import GaugeMetricFamily

    if not served:
        return
    family = GaugeMetricFamily("surgeon_served_confidence_ratio", "Mean confidence over the "
                               "recent frames (source: the frozen model).", labels=["model"])
    for model in ("adapted", "source"):
        if model in served:
            family.add_metric([model], served[model]["confidence"])
    yield family
    if "agreement" in served:
        yield GaugeMetricFamily("surgeon_models_agreement_ratio", "Share of recent frames where "
                                "adapted and source predict the same class.",
                                value=served["agreement"])


def _video(video) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not video:
        return
    yield CounterMetricFamily("surgeon_video_frames_dropped", "Frames the video outputs skipped "
                              "(a newer frame came first).", value=video["drops"])
    up = GaugeMetricFamily("surgeon_video_output_up", "1 while the output is open.",
                           labels=["uri"])
    for sink in video["sinks"]:
        up.add_metric([sink["uri"]], 1 if sink["state"] == "open" else 0)
    yield up


def _board(tegra) -> Iterator:
    """tegrastats' fields (Jetson only): loads as ratios, temperatures, rails in watts."""
    from prometheus_client.core import GaugeMetricFamily

    if not tegra:
        return
    loads = GaugeMetricFamily("surgeon_board_load_ratio", "tegrastats: GPU clusters and EMC "
                              "(memory controller) load.", labels=["engine"])
    for engine, load in dict(tegra.get("gpu_loads") or {}, EMC=tegra.get("emc_load")).items():
        if load is not None:
            loads.add_metric([engine], load / 100.0)
    yield loads
    temps = GaugeMetricFamily("surgeon_board_temperature_celsius", "tegrastats: thermal zones.",
                              labels=["zone"])
    for zone, celsius in (tegra.get("temperatures") or {}).items():
        if celsius is not None:
            temps.add_metric([zone], celsius)
    yield temps
    power = GaugeMetricFamily("surgeon_board_power_watts", "tegrastats: rails, now.",
                              labels=["rail"])
    for rail, (now, _) in (tegra.get("power_mw") or {}).items():
        power.add_metric([rail], now / 1000.0)
    yield power
    for key, name, text in (("swap_used_mb", "surgeon_board_swap_used_bytes", "Swap in use."),
                            ("lfb_block_mb", "surgeon_board_largest_free_block_bytes",
                             "tegrastats: size of the largest free blocks (lfb).")):
        if tegra.get(key) is not None:
            yield GaugeMetricFamily(name, text, value=tegra[key] * 2 ** 20)


class _TelemetryCollector:
    """Counters and gauges read from the telemetry snapshot at scrape time."""

    def __init__(self, exporter: MetricsExporter):
        self.exporter = exporter

    def describe(self):
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        snap = self.exporter.telemetry.snapshot()
        counters = snap["counters"]
        for key, (name, text) in _COUNTERS.items():
            yield CounterMetricFamily(name[:-len("_total")], text, value=counters.get(key, 0))
        source = snap.get("source") or {}
        for key, name, text in (("drops", "surgeon_frames_dropped", "Live frames overwritten "
                                 "before serving."),
                                ("reconnects", "surgeon_source_reconnects", "Source rebuilds.")):
            yield CounterMetricFamily(name, text, value=source.get(key) or 0)
        for key, (name, text, scale) in _GAUGES.items():
            value = snap.get(key)
            if isinstance(value, (int, float)):
                yield GaugeMetricFamily(name, text, value=value * scale)
        graph = snap.get("cuda_graph")
        if graph:   # NOTE [Captured step]
            yield CounterMetricFamily("surgeon_cuda_graph_replays", "Learner steps replayed "
                                      "from a captured CUDA graph.", value=graph["replays"])
            yield CounterMetricFamily("surgeon_cuda_graph_captures", "Captures of the "
                                      "learner's step.", value=graph["captures"])
        yield GaugeMetricFamily("surgeon_frames_per_second", "Serving rate over the last 5 s.",
                                value=snap.get("fps", 0.0))
        yield GaugeMetricFamily("surgeon_learner_paused", "1 while the learner is paused.",
                                value=1 if snap.get("learner_paused") else 0)
        up = GaugeMetricFamily("surgeon_source_up", "1 while the source streams.", value=1
                               if source.get("state") == "streaming" else 0)
        yield up
        yield from self._accuracy(snap)
        yield from _served(snap.get("served") or {})
        yield from _video(snap.get("video"))
        yield from _board(snap.get("tegra"))
        yield InfoMetricFamily("surgeon_build", "Versions and model.", value=self.exporter.info)

    @staticmethod
    def _accuracy(snap) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        accuracy = snap.get("accuracy")
        if not accuracy:
            return
        family = GaugeMetricFamily("surgeon_accuracy_ratio", "Accuracy on labelled frames "
                                   "(replay streams).", labels=["model"])
        for model, parts in accuracy.items():
            family.add_metric([model], parts["all"]["accuracy"])
        yield family
