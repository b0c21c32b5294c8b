"""Wiring and lifecycle: build everything from a config, serve frames, stop cleanly.

Construction does every check that can fail (URI, data, weights, method, devices, checkpoint
directory) before any thread starts, so a bad config never leaves a half-working daemon, and
resumes from the configured checkpoint. ``run`` binds the control sockets, serves frames on the
calling thread until the stream ends, a limit is reached or ``request_stop`` (SIGTERM, the
``shutdown`` command) is called, then saves a checkpoint when configured.
"""

import copy
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from surgeon_core import package_version
from surgeon_core.allocator import tune_malloc
from surgeon_core.methods import args_for, get_method
from surgeon_core.models.labels import class_name
from surgeon_core.models.spec import describe as describe_model

from .checkpoints import CheckpointStore, default_directory, model_fingerprint
from .safefiles import unsafe_directory, unwritable
from .config import ConfigError, DaemonConfig
from .learner import Learner
from .memory import MB, BudgetPolicy, MemoryProbe
from .health import Health
from .model import load_model
from .operations import Operations, OperationError
from .outputs import FrameInfo, VideoOutputs, make_sink, missing_requirements, parse_output_uri
from .sdnotify import Notifier
from .priority import SERVING_STREAM_PRIORITY, cuda_stream, on_stream, torch_threads
from .serving import Preprocessor, ServingModel, describe_prediction, to_uint8
from .sources import Grabber, UnknownSource, source_factory
from .telemetry import JsonlWriter, Telemetry

__all__ = ["Daemon", "resolve_device", "build_method", "check_learner_files", "check_config"]

log = logging.getLogger("surgeond")
EX_TEMPFAIL = 75      # sysexits.h: try again later (systemd's Restart=on-failure does)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is %s but CUDA is not available" % name)
    return device


def build_method(config: DaemonConfig, model: torch.nn.Module):
    """The configured method on a copy of ``model``; refuses methods serving cannot follow."""
    name = config.learner.method
    try:
        args = args_for(name, **config.learner.method_args)
        method = get_method(name)(copy.deepcopy(model), args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError("learner.method %s: %s" % (name, exc)) from None
    norms = [m for m in method.model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    if any(m.running_mean is None for m in norms):
        raise ConfigError("learner.method %s normalises with each test batch's statistics, which "
                          "per-frame serving cannot use; use surgeon, static or mecta" % name)
    return method


def check_learner_files(config: DaemonConfig, built) -> None:
    """Files a method needs beyond the weights, checked against the model: EcoTTA's warm-up
    must have been made for this very model (builder, classes, input size and weights)."""
    if config.learner.method != "ecotta":
        return
    from surgeon_core.methods.ecotta import load_warmup

    try:
        load_warmup(config.learner.method_args.get("warmup"), built.model, built.identity)
    except ValueError as exc:
        raise ConfigError("learner.method_args.warmup: %s" % exc) from None


def check_config(config: DaemonConfig):
    """Everything ``surgeond run`` checks before it starts a thread, without starting one: the
    source URI, the device, the model (built, loaded and run on one dummy batch) and the method
    on it. Returns the BuiltModel; raises ConfigError naming the fix."""
    try:
        source_factory(config.source.uri, config.source)
    except UnknownSource as exc:
        raise ConfigError("source.uri: %s" % exc) from None
    resolve_device(config.model.device)
    check_files(config)
    built = load_model(config.model)
    check_learner_files(config, built)
    build_method(config, built.model)
    return built


def check_files(config: DaemonConfig) -> None:
    """The files ``run`` opens, checked the same way by ``config --check``: the CURVE
    certificate is readable, output files and the checkpoint directory can be written."""
    control = config.control
    if control.enabled and control.curve_server_cert:
        from .control.security import load_server_cert

        try:
            load_server_cert(control.curve_server_cert)
        except ValueError as exc:
            raise ConfigError("control.curve_server_cert: %s" % exc) from None
    for name, path in (("output.predictions", config.output.predictions),
                       ("telemetry.jsonl", config.telemetry.jsonl)):
        problem = path and unwritable(Path(path), directory=False)
        if problem:
            raise ConfigError("%s: %s" % (name, problem))
    check_outputs(config)
    directory = Path(config.checkpoints.directory or default_directory())
    problem = unwritable(directory, directory=True) or (
        directory.is_dir() and unsafe_directory(directory))
    if problem:
        raise ConfigError("checkpoints.directory: %s" % problem)


def check_outputs(config: DaemonConfig) -> None:
    """Video outputs this machine can never run (a library it lacks), and files it cannot
    write, are configuration errors; a missing display or a taken port is retried instead."""
    specs = [parse_output_uri(uri) for uri in config.output.video]
    problems = missing_requirements(specs)
    for spec in specs:
        problem = spec.kind == "file" and unwritable(Path(spec.path), directory=False)
        if problem:
            problems.append("%s: %s" % (spec.uri, problem))
    if problems:
        raise ConfigError("output.video: " + "; ".join(problems))


def video_outputs(config: DaemonConfig) -> Optional[VideoOutputs]:
    out = config.output
    if not out.video:
        return None
    sinks = [make_sink(parse_output_uri(uri), out.rotate_mb, out.rotate_keep)
             for uri in out.video]
    return VideoOutputs(sinks, out.video_fps or config.source.fps, out.overlay,
                        out.video_min_height, config.learner.enabled)


def _warn_about_the_model(built, uri: str) -> None:
    if built.weights.startswith("random"):
        log.warning("model weights are a fresh random initialisation: its predictions mean "
                    "nothing (set model.weights to your trained file)")
    if uri.startswith("replay://") and built.num_classes != 10:
        log.warning("replay:// is labelled with CIFAR-10's 10 classes but %s has %d: its "
                    "accuracy figures say nothing about this model", built.builder,
                    built.num_classes)


class Daemon:
    """The service: grabber -> serving (this thread) -> ring buffer -> learner thread."""

    def __init__(self, config: DaemonConfig,
                 on_snapshot: Optional[Callable[[Dict], None]] = None):
        self.config = config
        tune_malloc(config.memory.malloc)   # NOTE [Giving memory back]
        threads = torch_threads(config.threads, config.learner.enabled)
        if threads:   # NOTE [Sharing the cores]
            torch.set_num_threads(threads)
        log.info("torch CPU threads: %d", torch.get_num_threads())
        self.device = resolve_device(config.model.device)
        check_files(config)
        try:
            self.factory = source_factory(config.source.uri, config.source)
        except UnknownSource as exc:
            raise ConfigError("source.uri: %s" % exc) from None
        self.built = load_model(config.model)
        log.info("model: %s", describe_model(self.built))
        _warn_about_the_model(self.built, config.source.uri)
        check_learner_files(config, self.built)
        model = self.built.model.to(self.device)
        self.class_names = self.built.class_names
        self.telemetry = Telemetry(config.telemetry.window)
        self.telemetry.set(model=dict(self.built.identity, classes=self.class_names))
        self.method = build_method(config, model)
        self.serving = ServingModel(copy.deepcopy(self.method.model))
        self.source_model = (ServingModel(copy.deepcopy(model))
                             if config.telemetry.compare_source else None)
        self.preprocess = Preprocessor(self.built.preprocessing, self.device)
        mem = config.memory
        self.probe = MemoryProbe(str(self.device), mem.tegrastats, mem.tegrastats_path, mem.jtop)
        self.policy = BudgetPolicy(None if mem.budget_mb is None else int(mem.budget_mb * MB),
                                   mem.available_share, int(mem.reserve_mb * MB))
        self.learner = Learner(self.method, self.serving, config.learner, self.telemetry,
                               self.device, self._budget, mem.poll_s)
        self.grabber = Grabber(self.factory, config.source.read_timeout_s,
                               config.source.reconnect_initial_s, config.source.reconnect_max_s)
        rotation = (config.output.rotate_mb, config.output.rotate_keep)
        self.predictions = JsonlWriter(config.output.predictions, *rotation)
        self.telemetry_log = JsonlWriter(config.telemetry.jsonl, *rotation)
        self.outputs = video_outputs(config)
        self.on_snapshot = on_snapshot
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self.exit_code = 0
        self.frames = 0
        self._domain: Optional[str] = None
        self.ops = self._operations()
        self.control = None
        self.notifier = Notifier()
        self.health: Optional[Health] = None
        self.metrics = self._metrics_exporter()
        self._serve_beat = time.monotonic()
        self._last_supervised = 0.0
        self._reporter: Optional[threading.Thread] = None
        self.grabber.on_state = self._on_source_state

    def _operations(self) -> Operations:
        """Checkpoints and the operator's view; resumes the configured checkpoint."""
        cfg = self.config.checkpoints
        fingerprint = model_fingerprint(self.built.builder, self.method.model.state_dict())
        store = CheckpointStore(Path(cfg.directory) if cfg.directory else default_directory(),
                                fingerprint, cfg.keep_last, identity=self.built.identity)
        ops = Operations(self, store, fingerprint)
        name, problems = ops.resume(cfg.resume)
        for problem in problems:
            log.warning("checkpoint not resumed: %s", problem)
        if name is not None:
            log.info("resumed from checkpoint %s (%d steps)", name, self.learner.steps)
        elif cfg.resume != "none":
            log.info("starting from the source weights%s", " (no usable checkpoint)"
                     if problems or cfg.resume != "newest" else "")
        self.telemetry.set(resumed_from=name)
        return ops

    def _metrics_exporter(self):
        if not self.config.metrics.enabled:
            return None
        from .doctor import l4t_release
        from .metrics import MetricsExporter

        info = {"version": package_version(), "torch": torch.__version__,
                "l4t": l4t_release() or "none", "arch": self.built.builder,
                "method": self.config.learner.method, "device": str(self.device)}
        return MetricsExporter(self.config.metrics, self.telemetry, info)

    def _on_source_state(self, old: str, new: str) -> None:
        kinds = {"streaming": "source.up", "backoff": "source.down", "ended": "source.ended"}
        if new in kinds:
            self.telemetry.event(kinds[new], source=self.grabber.description, previous=old,
                                 error=self.grabber.last_error)

    def _budget(self):
        sample = self.probe.read()
        budget, reason = self.policy.budget(sample)
        tegra = self.probe.tegrastats_sample
        self.telemetry.set(memory_available_mb=sample.available / MB,
                           tegra=None if tegra is None else tegra.as_dict(), jtop=sample.jtop,
                           memory_source=sample.source, lfb_blocks=sample.lfb_blocks,
                           process_rss_mb=None if sample.process_rss is None
                           else sample.process_rss / MB)
        return budget, reason, self.policy.peak_budget(sample)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reopen(self) -> None:
        """SIGHUP: reopen output files (after log rotation). Safe in a signal handler: it
        only sets a flag, which the serving loop acts on."""
        self._reopen.set()

    def _reopen_outputs(self) -> None:
        self._reopen.clear()
        for writer in (self.predictions, self.telemetry_log):
            writer.reopen()
        log.info("output files reopened (SIGHUP)")
        self.telemetry.event("outputs.reopened")

    def snapshot(self) -> Dict:
        self.telemetry.set(source=self.grabber.stats(), learner_steps=self.learner.steps)
        if self.outputs is not None:
            self.telemetry.set(video=self.outputs.stats())
        return self.telemetry.snapshot()

    def _start_endpoints(self) -> None:
        """Control sockets, then the metrics port; neither is left open if the other fails."""
        self._start_control()
        if self.metrics is None:
            return
        try:
            self.metrics.start()
        except OSError as exc:
            if self.control is not None:
                self.control.stop()
            raise ConfigError("metrics: cannot listen on %s:%d: %s" % (
                self.config.metrics.host, self.config.metrics.port, exc.strerror or exc)) \
                from None

    def _start_control(self) -> None:
        if not self.config.control.enabled:
            return
        from .control.server import ControlServer

        self.control = ControlServer(self.config.control, self.ops, self.telemetry).start()
        self.telemetry.listen(self.control.on_event)

    def run(self) -> Dict:
        """Serve until the stream ends, a limit is hit or a stop is requested; the last snapshot."""
        self._warm_up()
        self.ops.store.acquire()       # a second daemon on this directory stops here
        try:
            self._start_endpoints()
        except BaseException:
            self.ops.store.release()
            raise
        self.grabber.start()
        if self.outputs is not None:
            self.outputs.start()
        if self.config.learner.enabled:
            self.learner.start()
        self._reporter = self._start_reporter()
        self._announce_ready()
        self.health = health = Health(self.notifier, lambda: time.monotonic() - self._serve_beat,
                                      self.learner.beat_age, self.status_line).start()
        try:
            with on_stream(cuda_stream(self.device, SERVING_STREAM_PRIORITY)):
                self._serve_until_done()
        finally:
            self.notifier.stopping()
            health.stop()
            self._stop.set()
            self.grabber.stop()
            if self.outputs is not None:
                self.outputs.stop()
            self.learner.stop()
            self._reporter.join(2.0)
            self._checkpoint_on_exit()
            final = self.snapshot()
            self.telemetry_log.write(final)
            self.telemetry_log.close()
            self.predictions.close()
            self.probe.close()
            if self.control is not None:
                self.control.publish("telemetry", final)
                self.control.stop()
            self.notifier.close()
            if self.metrics is not None:
                self.metrics.stop()
            self.ops.store.release()
        return final

    def _start_reporter(self) -> threading.Thread:
        reporter = threading.Thread(target=self._report_loop, name="telemetry", daemon=True)
        reporter.start()
        return reporter

    def _supervise(self, every_s: float = 1.0) -> None:
        """The serving loop (the root thread) starts again any helper thread that ended."""
        if self._reopen.is_set():
            self._reopen_outputs()
        now = time.monotonic()
        if now - self._last_supervised < every_s:
            return
        self._last_supervised = now
        if self.grabber.stuck:
            log.error("source %s: %s; stopping so that systemd restarts the daemon",
                      self.grabber.description, self.grabber.last_error)
            self.exit_code = EX_TEMPFAIL
            self.request_stop()
        if not self._reporter.is_alive() and not self._stop.is_set():
            log.error("telemetry thread had stopped; started again")
            self.telemetry.count("telemetry_restarts")
            self._reporter = self._start_reporter()
        if self.control is not None:
            self.control.ensure_running()     # health reaches telemetry in _report

    def _announce_ready(self) -> None:
        """READY=1 once the model, the control sockets and the source's first attempt are done
        (a camera that is down does not hold the start: the grabber keeps retrying)."""
        if not self.notifier.enabled:
            return
        deadline = time.monotonic() + self.config.source.read_timeout_s
        while self.grabber.state == "connecting" and time.monotonic() < deadline:
            time.sleep(0.02)
        self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status surgeond` shows."""
        snap = self.telemetry.snapshot()
        cache, budget, peak = snap.get("cache_mb"), snap.get("budget_mb"), snap.get("peak_mb")
        peak_budget, parts = snap.get("peak_budget_mb"), snap.get("micro_batches") or 1
        memory = "cache %s/%s MB, step peak %s%s MB%s" % (
            "-" if cache is None else "%.1f" % cache, "-" if budget is None else "%.1f" % budget,
            "-" if peak is None else "%.0f" % peak,
            "" if peak_budget is None else "/%.0f" % peak_budget,
            " in %d micro-batches" % parts if parts > 1 else "")
        shares = snap.get("classes") or {}
        seen = ", ".join("%s %.0f%%" % (name, 100 * share)
                         for name, share in list(shares.items())[:2])
        tegra = snap.get("tegra") or {}
        board = "" if tegra.get("gpu_load") is None else ", GPU %d%%" % tegra["gpu_load"]
        return "%.1f fps, %s%s, learner %s (%d steps), source %s%s" % (
            snap.get("fps", 0.0), memory, board, self.ops.learner_state(), self.learner.steps,
            self.grabber.state, ", seeing %s" % seen if seen else "")

    def _checkpoint_on_exit(self) -> None:
        if not self.config.checkpoints.on_exit or self.learner.steps == 0:
            return
        try:
            entry = self.ops.save_checkpoint(None)
            log.info("saved checkpoint %s on the way out", entry["name"])
        except (OperationError, OSError) as exc:
            log.error("no checkpoint on exit: %s", exc)

    def _periodic_checkpoint(self) -> None:
        every = self.config.checkpoints.every_s
        if not every or time.monotonic() - self._last_auto_save < every:
            return
        self._last_auto_save = time.monotonic()
        try:
            self.ops.save_checkpoint(None)
        except (OperationError, OSError) as exc:
            log.error("periodic checkpoint failed: %s", exc)

    def _warm_up(self, runs: int = 3) -> None:
        """First calls allocate and pick kernels; keep them out of the latency figures."""
        size = self.built.preprocessing.crop
        x = torch.zeros(1, 3, size, size, device=self.device)
        for model in filter(None, (self.serving, self.source_model)):
            for _ in range(runs):
                model.predict(x)

    def _serve_until_done(self) -> None:
        """Frames until the stream ends, a limit is hit or a stop is requested."""
        deadline = (time.monotonic() + self.config.duration_s) if self.config.duration_s else None
        while not self._stop.is_set():
            self._serve_beat = time.monotonic()
            self._supervise()
            if deadline is not None and time.monotonic() >= deadline:
                return
            if self.config.max_frames and self.frames >= self.config.max_frames:
                return
            frame = self.grabber.get(0.2)
            if frame is None:
                if self.grabber.ended:
                    return
                continue
            with self.serving.turn.serving():   # the learner gives way meanwhile
                self._serve(frame)

    def _serve(self, frame) -> None:
        start = time.monotonic()
        capture_s = max(0.0, start - frame.timestamp)
        try:
            x = self.preprocess(frame.image)
        except ValueError as exc:
            self.telemetry.count("bad_frames")
            log.warning("frame %d dropped: %s", frame.index, exc)
            return
        prep_s = time.monotonic() - start
        logits, infer_s = self.serving.predict(x)
        self.frames += 1
        self.telemetry.stage(self._serving_split(), infer_s)
        self.telemetry.frame({"capture": capture_s, "preprocess": prep_s, "infer": infer_s})
        if self.config.learner.enabled:
            self.learner.offer(to_uint8(x))
        prediction = describe_prediction(logits, self.class_names)
        source = self._source_prediction(x)
        self.telemetry.predicted(prediction, source)
        if frame.domain != self._domain:
            self._domain = frame.domain
            self.telemetry.set(domain=frame.domain)
        if frame.label is not None:
            self._score(frame, prediction, source)
        record = {"frame": frame.index, "time": time.time(), **prediction,
                  **({"label": frame.label, "domain": frame.domain}
                     if frame.label is not None else {}),
                  **({"source": source} if source is not None else {})}
        self.predictions.write(record)
        if self.outputs is not None:
            label = None if frame.label is None else class_name(self.class_names, frame.label)
            self.outputs.offer(frame.image, FrameInfo(prediction, source, label))
        if self.control is not None and self.config.control.publish_predictions:
            self.control.publish("prediction", record)

    def _serving_split(self) -> str:
        """Which serving latency a frame counts in: the learner stepping, the learner off, or
        the start-up before its first step (first allocations, the first probe), kept apart so
        that neither of the others carries it."""
        learner = self.learner
        if not self.config.learner.enabled or learner.user_paused or learner.paused_reason:
            return "infer_learner_off"
        return "infer_learner_on" if learner.steps > 0 else "infer_learner_starting"

    def _source_prediction(self, x) -> Optional[Dict]:
        """The frozen source model's prediction, when it runs (telemetry.compare_source)."""
        if self.source_model is None:
            return None
        logits, _ = self.source_model.predict(x)
        return describe_prediction(logits, self.class_names)

    def _score(self, frame, adapted: Dict, source: Optional[Dict]) -> None:
        self.telemetry.labelled("adapted", frame.domain, adapted["class"] == frame.label)
        if source is not None:
            self.telemetry.labelled("source", frame.domain, source["class"] == frame.label)

    def _report_loop(self) -> None:
        """Snapshots every telemetry.interval_s and periodic checkpoints, each on its own
        clock: a long telemetry interval set live must not hold the checkpoints back."""
        self._last_auto_save = last_report = time.monotonic()
        while not self._stop.wait(min(self.config.telemetry.interval_s, 0.5)):
            try:
                if time.monotonic() - last_report >= self.config.telemetry.interval_s:
                    last_report = time.monotonic()
                    self._report()
                self._periodic_checkpoint()
            except Exception:  # noqa: BLE001 - telemetry and periodic saves must go on
                self.telemetry.count("telemetry_faults")
                log.exception("telemetry round failed")

    def _report(self) -> None:
        if self.control is not None:
            self.telemetry.set(control=self.control.health())
        snap = self.snapshot()
        if self.outputs is not None:
            self.outputs.status(snap)
        self.telemetry_log.write(snap)
        if self.control is not None:
            self.control.publish("telemetry", snap)
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(snap)
            except Exception:  # noqa: BLE001 - a view must never stop the daemon
                log.exception("telemetry view failed")
