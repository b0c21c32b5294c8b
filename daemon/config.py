"""The daemon's whole configuration: pydantic models, YAML file, environment and CLI overrides.

Precedence, lowest first: the defaults here, the YAML file, ``SURGEON_<SECTION>__<FIELD>``
environment variables, then ``--set section.field=value`` on the command line. Values in the
last two are parsed as YAML scalars (``32``, ``0.5``, ``true``, ``null``, ``[a, b]``). Every
model forbids unknown fields, so a typo is an error that names the field, never a silent
default. ``load_config`` either returns a complete, valid config or raises ConfigError.
"""

import copy
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from surgeon_core.errors import SurgeonError

__all__ = ["ConfigError", "DaemonConfig", "load_config", "default_yaml", "ENV_PREFIX"]

ENV_PREFIX = "SURGEON_"
DEFAULT_SOURCE = ("replay://cifar10?schedule=clean:600,gaussian_noise:1500,fog:1500,"
                  "contrast:1500&severity=5&fps=0&seed=0")


class ConfigError(SurgeonError, ValueError):
    """The configuration is invalid; the message names every bad field."""


class _Section(BaseModel):
    # infinities and NaN are refused everywhere: no setting means anything at either
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(_Section):
    """Where frames come from (URI schemes: see daemon/sources)."""

    uri: str = Field(DEFAULT_SOURCE, description="csi://N, v4l2:///dev/videoN, rtsp://, file://, "
                     "dir://, gst://<pipeline>, replay://cifar10?..., synthetic://")
    width: int = Field(1280, ge=16, description="capture width (camera sources)")
    height: int = Field(720, ge=16, description="capture height (camera sources)")
    fps: int = Field(30, ge=1, le=240, description="requested camera frame rate")
    backend: str = Field("auto", pattern="^(auto|gstreamer|opencv)$",
                         description="auto: GStreamer when OpenCV has it, else OpenCV's own")
    rtsp_latency_ms: int = Field(200, ge=0)
    decoder: str = Field("auto", description="GStreamer decoder for RTSP and MJPEG cameras; "
                         "auto: nvv4l2decoder (+ nvvidconv) on Jetson, decodebin or the "
                         "software decoder elsewhere")
    codec: str = Field("h264", pattern="^(h264|h265)$", description="RTSP stream codec, for "
                       "a pinned decoder (Jetson's); decodebin finds it by itself")
    read_timeout_s: float = Field(3.0, gt=0, le=3600,
                                  description="no frame for this long: rebuild")
    reconnect_initial_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=86400)


class PreprocessConfig(_Section):
    """Frame to model input; unset fields take the architecture's published defaults."""

    resize: Optional[int] = Field(None, ge=8, description="shorter side before the centre crop")
    crop: Optional[int] = Field(None, ge=8, description="the model's square input size")
    letterbox: bool = Field(False, description="fit the whole frame in, padded (no crop)")
    squash: bool = Field(False, description="resize to the square, aspect ratio ignored "
                         "(the CIFAR default)")
    mean: Optional[List[float]] = Field(None, min_length=3, max_length=3,
                                        description="per-channel mean of [0, 1] RGB")
    std: Optional[List[float]] = Field(None, min_length=3, max_length=3)
    interpolation: Optional[str] = Field(None, pattern="^(bilinear|bicubic|nearest)$")

    @model_validator(mode="after")
    def _one_geometry(self):
        if self.letterbox and self.squash:
            raise ValueError("choose letterbox or squash, not both")
        if self.resize is not None and (self.letterbox or self.squash):
            raise ValueError("resize applies to the centre crop only; drop it with letterbox "
                             "or squash")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError("%s must be finite numbers" % name)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std must be > 0")
        return self

    def mode(self) -> Optional[str]:
        return "letterbox" if self.letterbox else "squash" if self.squash else None


class ModelConfig(_Section):
    """The user's model (docs/MODELS.md)."""

    arch: str = Field("cifar:resnet20", min_length=1, description="cifar:resnet20 (or a bare "
                      "CIFAR name), torchvision:NAME, or python:package.module:callable")
    num_classes: Optional[int] = Field(None, ge=1, description="default: the labels' count, "
                                       "else the architecture's")
    weights: Optional[str] = Field(None, description="state dict file (or torchvision:DEFAULT); "
                                   "CIFAR default: the shared models directory")
    labels: Optional[str] = Field(None, description="class names: one per line, or a JSON list "
                                  "or {index: name}")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the "
                                   "builder or factory")
    python_path: List[str] = Field(default_factory=list, description="folders searched first "
                                   "for python: factories")
    input_size: Optional[int] = Field(None, ge=8, description="older spelling of "
                                      "preprocess.crop")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")

    @model_validator(mode="after")
    def _one_input_size(self):
        crop = self.preprocess.crop
        if self.input_size is not None and crop is not None and crop != self.input_size:
            raise ValueError("input_size (%d) and preprocess.crop (%d) disagree; keep one"
                             % (self.input_size, crop))
        return self

    def crop(self) -> Optional[int]:
        return self.preprocess.crop if self.preprocess.crop is not None else self.input_size


class LearnerConfig(_Section):
    enabled: bool = True
    method: str = Field("surgeon", description="any registered method (surgeon_core.methods)")
    method_args: Dict[str, Any] = Field(default_factory=dict,
                                        description="overrides of the method's defaults")
    batch_size: int = Field(64, ge=2, le=4096)
    min_batch_size: int = Field(8, ge=2, description="out of memory halves the batch down to this")
    buffer_size: int = Field(512, ge=2, le=65536, description="ring buffer of recent frames")
    fresh_frames: int = Field(32, ge=1, description="new frames needed before the next step")
    publish_every: int = Field(1, ge=1, le=1_000_000,
                               description="copy weights to serving every k steps")
    good_every: int = Field(20, ge=1, le=1_000_000,
                            description="snapshot a rollback state every k steps")
    collapse_entropy: float = Field(0.02, ge=0, le=1, description="mean entropy / ln C below this")
    collapse_class_share: float = Field(0.95, gt=0, le=1,
                                        description="... with this share of one class: collapse")
    yield_ms: float = Field(100.0, ge=0, le=10000,
                            description="longest the learner waits in all, per step, between "
                                        "layers for frames being served (0: never waits)")

    @model_validator(mode="after")
    def _batch_fits(self):
        """Checked on every assignment too, so a live change cannot break it."""
        rules = (("min_batch_size", "batch_size", ""),
                 ("batch_size", "buffer_size", ": batches come from the ring buffer"),
                 ("fresh_frames", "buffer_size", ""))
        for small, large, why in rules:
            if getattr(self, small) > getattr(self, large):
                raise ValueError("learner.%s (%d) must not exceed learner.%s (%d)%s" % (
                    small, getattr(self, small), large, getattr(self, large), why))
        return self


class MemoryConfig(_Section):
    budget_mb: Optional[float] = Field(None, gt=0, le=1e9,
                                       description="hard cap on the activation cache")
    available_share: float = Field(0.25, gt=0, le=1,
                                   description="share of available memory above the reserve "
                                   "that one step may take at its peak (NOTE [Peak budget])")
    reserve_mb: float = Field(256.0, ge=0, le=1e9,
                              description="available memory never planned on")
    poll_s: float = Field(5.0, ge=0.01, le=3600,
                          description="re-read memory and re-plan the budget")
    tegrastats: str = Field("auto", pattern="^(auto|on|off)$")
    tegrastats_path: str = "tegrastats"
    jtop: bool = Field(False, description="read jetson-stats' service (optional, AGPL)")
    malloc: str = Field("trim", pattern="^(trim|return|default)$", description="glibc: trim "
                        "(free pages handed back before each step), return (every large block "
                        "returned at free: footprint follows live tensors, steps slower), "
                        "default (glibc untouched); NOTE [Giving memory back]")
    allocator: str = Field("auto", pattern="^(auto|tcmalloc|jemalloc|glibc)$",
                           description="malloc to run under: auto (tcmalloc where installed, "
                           "else glibc), tcmalloc, jemalloc, glibc; the daemon executes itself "
                           "again with it preloaded (NOTE [Preloaded allocator])")


class TelemetryConfig(_Section):
    interval_s: float = Field(1.0, ge=0.05, le=3600, description="telemetry snapshot period")
    window: int = Field(4096, ge=16, description="latency samples kept for percentiles")
    jsonl: Optional[str] = Field(None, description="append snapshots to this file")
    compare_source: bool = Field(False, description="also run the frozen source model on every "
                                 "frame: both accuracies on labelled frames (replay), both "
                                 "confidences and their agreement on any stream, both "
                                 "predictions on the video overlay")


class OutputConfig(_Section):
    predictions: Optional[str] = Field(None, description="JSONL file of per-frame predictions")
    rotate_mb: Optional[float] = Field(100.0, gt=0, le=1e6, description="the predictions and "
                                       "telemetry files move to NAME.1 at this size; null: never")
    rotate_keep: int = Field(5, ge=1, le=1000, description="rotated files kept (NAME.1 newest)")
    video: List[str] = Field(default_factory=list, description="video outputs with overlays: "
                             "display://0, file:///path/out.mp4 (.mkv, .avi), rtsp://@:8554/live, "
                             "rtp://HOST:PORT; several at once")
    overlay: bool = Field(True, description="draw predictions, fps, cache and learner state")
    video_fps: Optional[float] = Field(None, gt=0, le=240, description="frame rate written to "
                                       "the outputs; default source.fps")
    video_min_height: int = Field(360, ge=16, le=4320, description="smaller frames are "
                                  "enlarged by a whole factor to at least this height")

    @field_validator("video")
    @classmethod
    def _video_uris(cls, uris):
        from .outputs.uri import BadOutputUri, parse_output_uri

        specs = []
        for uri in uris:
            try:
                specs.append(parse_output_uri(uri))
            except BadOutputUri as exc:
                raise ValueError(str(exc)) from None
        targets = [(s.kind, s.path, s.port) for s in specs if s.kind in ("file", "rtsp")]
        if len(set(targets)) != len(targets):
            raise ValueError("two outputs write the same file or serve the same port")
        return uris


class ControlConfig(_Section):
    """The ZMQ control plane (docs/PROTOCOL.md)."""

    enabled: bool = True
    runtime_dir: Optional[str] = Field(None, description="where the ipc sockets live; default: "
                                       "$RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/surgeon or "
                                       "/tmp/surgeon-<uid>")
    endpoint: Optional[str] = Field(None, description="ROUTER for requests; default "
                                    "ipc://<runtime_dir>/control.sock")
    pub_endpoint: Optional[str] = Field(None, description="PUB for telemetry and events; default "
                                        "ipc://<runtime_dir>/telemetry.sock")
    socket_access: str = Field("owner", pattern="^(owner|group)$",
                               description="who may use the ipc sockets besides root")
    curve_server_cert: Optional[str] = Field(None, description="the server's secret certificate "
                                             "(surgeonctl keygen); required off loopback")
    curve_clients_dir: Optional[str] = Field(None, description="public certificates of allowed "
                                             "clients; none: any client that knows the server key")
    max_message_bytes: int = Field(65536, ge=1024, description="larger requests get TOO_LARGE")
    max_requests_per_s: int = Field(500, ge=10, le=100_000, description="requests handled "
                                    "per second; more wait in the queue (a flood must not "
                                    "slow serving)")
    max_connections: int = Field(64, ge=2, le=4096, description="connections each socket "
                                 "holds; newer ones are closed (descriptors are finite)")
    publish_predictions: bool = Field(True, description="a 'prediction' message per frame")

    @field_validator("endpoint", "pub_endpoint", "curve_server_cert", "curve_clients_dir",
                     "runtime_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """``SURGEON_CONTROL__CURVE_SERVER_CERT=`` means unset, and is checked as unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _no_open_tcp(self):
        from .control.security import require_safe_endpoint

        for endpoint in (self.endpoint, self.pub_endpoint):
            if endpoint:
                require_safe_endpoint(endpoint, bool(self.curve_server_cert))
        return self


class CheckpointConfig(_Section):
    """Checkpoints of the learner's state (daemon/checkpoints.py)."""

    directory: Optional[str] = Field(None, description="default: $STATE_DIRECTORY/checkpoints or "
                                     "~/.local/state/surgeon/checkpoints")
    keep_last: int = Field(5, ge=1, description="automatic checkpoints kept; named ones stay")
    every_s: Optional[float] = Field(None, ge=0.05, le=31_536_000,
                                     description="save automatically this often")
    on_exit: bool = Field(True, description="save one when stopped by SIGTERM or shutdown")
    resume: str = Field("newest", pattern=r"^(newest|none|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$",
                        description="at start: newest (valid), none, or a name")


class MetricsConfig(_Section):
    """The optional Prometheus exporter (extra 'metrics')."""

    enabled: bool = False
    host: str = Field("127.0.0.1", description="loopback by default; 0.0.0.0 exposes it to "
                      "the network (firewall it, or scrape through a tunnel)")
    port: int = Field(9708, ge=0, le=65535, description="0: any free port")


class DaemonConfig(_Section):
    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: half the cores while the "
                         "learner runs (serving and learner at once), else torch's default")
    duration_s: Optional[float] = Field(None, gt=0, description="stop after this long")
    max_frames: Optional[int] = Field(None, ge=1, description="stop after this many frames")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: str = Field("text", pattern="^(text|json)$", description="text (under systemd "
                            "with journald priority prefixes) or json, one object per line")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        got = "" if item["type"] == "missing" else " (got %r)" % (item.get("input"),)
        lines.append("  %s: %s%s" % (where, item["msg"], got))
    return "invalid configuration:\n" + "\n".join(lines)


def _set_path(tree: Dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError("%s: empty setting name" % origin)
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("%s: %s is not a section" % (origin, part))
        node = child
    node[parts[-1]] = value


def _scalar(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError as exc:
        raise ConfigError("%s: cannot parse %r: %s" % (origin, text, exc)) from None


def env_overrides(environ: Mapping[str, str]) -> List[tuple]:
    """``SURGEON_LEARNER__BATCH_SIZE=32`` -> ``("learner.batch_size", 32)``; other SURGEON_*
    variables (data and model directories) are not config and are ignored here."""
    found = []
    for key, text in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and "__" in key:
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            found.append((dotted, _scalar(text, key)))
    return found


def read_yaml(path: Path) -> Dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror or exc)) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config %s is not valid YAML: %s" % (path, exc)) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("config %s must be a mapping of sections, got %s"
                          % (path, type(tree).__name__))
    return tree


def load_config(path: Optional[Path] = None, overrides: Optional[List[str]] = None,
                environ: Optional[Mapping[str, str]] = None) -> DaemonConfig:
    """File, then environment, then ``section.field=value`` overrides; validated as a whole."""
    tree = copy.deepcopy(read_yaml(path)) if path is not None else {}
    environ = os.environ if environ is None else environ
    for dotted, value in env_overrides(environ):
        _set_path(tree, dotted, value, "environment")
    for item in overrides or []:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError("--set %r: expected section.field=value" % item)
        _set_path(tree, name.strip(), _scalar(text, "--set " + name), "--set " + item)
    try:
        return DaemonConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def default_yaml() -> str:
    """The full default config as commented YAML, to start a config file from."""
    lines = ["# surgeond configuration: every field with its default.",
             "# Override any field with SURGEON_<SECTION>__<FIELD>=... or --set section.field=..."]
    _section_lines(DaemonConfig(), "", lines)
    return "\n".join(lines) + "\n"


def _section_lines(section: BaseModel, indent: str, lines: List[str]) -> None:
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if info.description:
            lines.append("%s# %s" % (indent, info.description))
        if isinstance(value, BaseModel):
            lines.append("%s%s:" % (indent, name))
            _section_lines(value, indent + "  ", lines)
        else:
            lines.append(indent + _yaml_line(name, value))


def _yaml_line(key: str, value: Any) -> str:
    return yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
