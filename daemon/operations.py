"""What operators can do to a running daemon; the control commands call these.

Each operation validates first and changes state second, so a refused request changes nothing.
Operations that touch the learner's weights wait for a step in progress (Learner's lock) and
publish to serving before they return.
"""

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from pydantic import ValidationError

from surgeon_core import package_version
from surgeon_core.allocator import allocator_name

from .checkpoints import CheckpointError, CheckpointStore
from .config import DaemonConfig
from .memory import MB

__all__ = ["Operations", "LIVE_KEYS", "OperationError"]

log = logging.getLogger("surgeond.ops")

# settings that take effect while running; everything else needs a restart
LIVE_KEYS = (
    "memory.budget_mb", "memory.available_share", "memory.reserve_mb",
    "learner.enabled", "learner.batch_size", "learner.fresh_frames", "learner.publish_every",
    "learner.good_every", "learner.collapse_entropy", "learner.collapse_class_share",
    "learner.yield_ms", "learner.method_args.lr", "learner.method_args.margin",
    "learner.method_args.consistency_weight", "learner.method_args.keep_floor",
    "telemetry.interval_s", "control.publish_predictions", "log_level",
)
_METHOD_OPTIONS = {"margin": (0.0, 1.0), "keep_floor": (0.0, 1.0),
                   "consistency_weight": (0.0, 1e6), "lr": (0.0, 10.0)}


class OperationError(Exception):
    """A refused operation; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Operations:
    """The daemon as operators see it: state, settings, checkpoints, lifecycle."""

    def __init__(self, daemon, store: Optional[CheckpointStore], fingerprint: str):
        self.daemon, self.store, self.fingerprint = daemon, store, fingerprint
        self.config: DaemonConfig = daemon.config
        self.learner, self.telemetry = daemon.learner, daemon.telemetry
        self.started = time.time()
        self.last_checkpoint: Optional[str] = None
        self.resumed_from: Optional[str] = None

    # -- state ---------------------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        snap = self.daemon.snapshot()
        learner = self.learner
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
            "arch": self.daemon.built.builder, "method": self.config.learner.method,
            "model": self.daemon.built.identity,
            "classes": (self.daemon.class_names or [])[:32],
            "prediction": snap.get("prediction"), "recent_classes": snap.get("classes"),
            "device": str(self.daemon.device), "allocator": allocator_name(),
            "version": package_version(),
            "model_fingerprint": self.fingerprint,
            "frames": self.daemon.frames, "fps": snap.get("fps"),
            "learner": {"state": self.learner_state(), "steps": learner.steps,
                        "batch_size": learner.batch_size, "paused_reason": learner.paused_reason},
            "budget_mb": snap.get("budget_mb"), "cache_mb": snap.get("cache_mb"),
            "peak_mb": snap.get("peak_mb"), "resident_peak_mb": snap.get("resident_peak_mb"),
            "peak_budget_mb": snap.get("peak_budget_mb"), "peak_bounded": snap.get("peak_bounded"),
            "micro_batches": snap.get("micro_batches"), "cuda_graph": snap.get("cuda_graph"),
            "reserved_mb": snap.get("reserved_mb"), "process_rss_mb": snap.get("process_rss_mb"),
            "source": snap.get("source"), "last_checkpoint": self.last_checkpoint,
            "resumed_from": self.resumed_from,
            "control": None if self.daemon.control is None else self.daemon.control.health(),
        }

    def learner_state(self) -> str:
        learner = self.learner
        if not learner.running:
            return "off"
        if learner.user_paused:
            return "paused"
        return "waiting" if learner.paused_reason else "running"

    # -- settings ------------------------------------------------------------------------
    def get_setting(self, key: Optional[str]) -> Any:
        tree = self.config.model_dump()
        tree["learner"]["method_args"] = dict(tree["learner"]["method_args"],
                                              **self._method_options())
        if not key:
            return tree
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise OperationError("NOT_FOUND", "no setting %r" % key)
            node = node[part]
        return node

    def _method_options(self) -> Dict[str, Any]:
        method = self.learner.method
        live = {k: getattr(method.args, k) for k in _METHOD_OPTIONS
                if hasattr(getattr(method, "args", None), k)}
        optimizer = getattr(method, "optimizer", None)
        if optimizer is not None:
            live["lr"] = optimizer.param_groups[0]["lr"]
        return live

    def set_setting(self, key: str, value: Any) -> Any:
        """Apply a live setting; returns the value now in force."""
        if key not in LIVE_KEYS:
            raise OperationError("INVALID_ARGS", "%s cannot change while running (live: %s)"
                                 % (key, ", ".join(LIVE_KEYS)))
        if key.startswith("learner.method_args."):
            return self._set_method_option(key.rsplit(".", 1)[1], value)
        section, field = key.split(".", 1) if "." in key else (None, key)
        candidate = self._with_setting(section, field, value)
        new = getattr(candidate if section is None else getattr(candidate, section), field)
        self._apply(key, new)      # may still refuse: nothing is stored before it agrees
        target = self.config if section is None else getattr(self.config, section)
        setattr(target, field, new)
        self.telemetry.event("config.changed", key=key, value=new)
        return new

    def _with_setting(self, section: Optional[str], field: str, value: Any) -> DaemonConfig:
        """The whole configuration with one value changed, validated as at start (types,
        ranges, and the rules between fields); the one in force is left untouched."""
        tree = self.config.model_dump()
        (tree if section is None else tree[section])[field] = value
        try:
            return DaemonConfig.model_validate(tree)
        except ValidationError as exc:
            item = exc.errors()[0]
            raise OperationError("INVALID_ARGS", "%s: %s" % (
                ".".join(str(p) for p in item["loc"]) or (section or field), item["msg"])) \
                from None

    def _apply(self, key: str, value: Any) -> None:
        policy = self.daemon.policy
        if key == "memory.budget_mb":
            policy.cap_bytes = None if value is None else int(value * MB)
        elif key == "memory.available_share":
            policy.share = value
        elif key == "memory.reserve_mb":
            policy.reserve_bytes = int(value * MB)
        elif key == "learner.enabled":
            self.set_adapting(bool(value))
        elif key == "learner.batch_size":
            self.learner.batch_size = value
        elif key == "log_level":
            logging.getLogger().setLevel(value)
        if key.startswith("memory."):
            self.learner.replan()

    def _set_method_option(self, name: str, value: Any) -> Any:
        low, high = _METHOD_OPTIONS[name]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or not low <= value <= high or (name == "lr" and value <= 0):
            raise OperationError("INVALID_ARGS", "%s must be a number in [%g, %g]"
                                 % (name, low, high))
        method = self.learner.method
        try:
            if name == "lr":
                self.learner.set_lr(float(value))
            elif hasattr(getattr(method, "args", None), name):
                self.learner.set_method_option(name, float(value))
            else:
                raise ValueError("method %s has no option %s" % (method.name, name))
        except ValueError as exc:
            raise OperationError("INVALID_ARGS", str(exc)) from None
        self.config.learner.method_args[name] = float(value)
        self.telemetry.event("config.changed", key="learner.method_args." + name, value=value)
        return float(value)

    # -- learner -------------------------------------------------------------------------
    def set_adapting(self, on: bool) -> None:
        if on and not self.learner.running:
            self.learner.start()
        self.learner.pause(not on)

    def reset(self) -> Dict[str, Any]:
        self.learner.reset_to_source()
        self.telemetry.event("model.reset")
        return {"reset": True, "steps": self.learner.steps}

    # -- checkpoints ---------------------------------------------------------------------
    def _require_store(self) -> CheckpointStore:
        if self.store is None:
            raise OperationError("UNAVAILABLE", "checkpoints are not configured")
        return self.store

    def _meta(self) -> Dict[str, Any]:
        config = self.config
        settings = json.dumps({"model": config.model.model_dump(),
                               "learner": config.learner.model_dump()}, sort_keys=True,
                              default=str)
        return {"arch": self.daemon.built.builder, "model": self.daemon.built.identity,
                "method": config.learner.method,
                "steps": self.learner.steps, "frames": self.daemon.frames,
                "config_fingerprint": hashlib.sha256(settings.encode()).hexdigest()[:16]}

    def save_checkpoint(self, name: Optional[str]) -> Dict[str, Any]:
        store = self._require_store()
        state = self.learner.export_state()
        entry = store.save(name, state, self._meta())
        self.last_checkpoint = entry["name"]
        self.telemetry.event("checkpoint.saved", name=entry["name"], steps=entry["steps"],
                             bytes=entry["bytes"])
        return entry

    def list_checkpoints(self) -> List[Dict[str, Any]]:
        return self._require_store().list()

    def load_checkpoint(self, name: str) -> Dict[str, Any]:
        state, meta = self._require_store().load(name)
        note = self._import(state, meta)
        self.telemetry.event("checkpoint.loaded", name=name, steps=meta.get("steps"))
        return dict(meta, note=note)

    def _import(self, state: Dict[str, Any], meta: Dict[str, Any]) -> str:
        try:
            return self.learner.import_state(state, meta.get("steps"))
        except ValueError as exc:
            raise CheckpointError("CORRUPT", "checkpoint %s: %s" % (meta.get("name"), exc)) \
                from None

    def delete_checkpoint(self, name: str) -> None:
        self._require_store().delete(name)
        self.telemetry.event("checkpoint.deleted", name=name)

    def resume(self, which: str) -> Tuple[Optional[str], List[str]]:
        """Load the configured checkpoint at start, trying older ones when ``which`` is
        'newest': (the name loaded or None, why each tried one was refused)."""
        if self.store is None or which == "none":
            return None, []
        names = ([e["name"] for e in reversed(self.store.list())] if which == "newest"
                 else [which])
        problems = []
        for name in names:
            try:
                state, meta = self.store.load(name)
                self._import(state, meta)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            self.resumed_from = self.last_checkpoint = name
            return name, problems
        return None, problems

    # -- lifecycle -----------------------------------------------------------------------
    def restart_source(self) -> None:
        self.daemon.grabber.restart()

    def shutdown(self) -> None:
        """Stop the daemon (as SIGTERM does: a checkpoint first when on_exit is set)."""
        self.daemon.request_stop()
