"""Checkpoints of the learner's state: atomic writes, safe loads, a manifest, retention.

NOTE [Checkpoint durability]
A checkpoint is written to a temporary file in its own directory, flushed and fsynced, renamed
over its final name and the directory fsynced, so a crash (kill -9, power loss) leaves either
the old file or the new one, never a torn one. The manifest (``manifest.json``) is written the
same way after the checkpoint; a crash between the two leaves a checkpoint the manifest does
not list yet, so listing also reads the metadata embedded in every file and the manifest is
only an index (with each file's SHA-256, checked on load). Order is a sequence number, not the
wall clock: a Jetson without a battery-backed clock boots in 1970 until NTP answers.

Loading never unpickles code: ``torch.load(weights_only=True)`` accepts tensors and plain
containers only, so a crafted file that would run code is refused. A checkpoint whose model
fingerprint (architecture, parameter names, shapes, dtypes) differs from the running model's is
refused before any tensor is copied.
"""

import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from surgeon_core.errors import SurgeonError
from surgeon_core.models.zoo import sha256_of

__all__ = ["CheckpointError", "CheckpointStore", "model_fingerprint", "default_directory",
           "describe_identity",
           "validate_name", "FORMAT"]

log = logging.getLogger("surgeond.checkpoints")
FORMAT = "surgeon-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".pt"
AUTO_PREFIX = "auto-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CheckpointError(SurgeonError):
    """A checkpoint cannot be saved or used; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def default_directory() -> Path:
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "checkpoints"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "surgeon" / "checkpoints"


def validate_name(name: str, allow_auto: bool = False) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise CheckpointError("INVALID_ARGS", "checkpoint name %r: use 1-64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit" % (name,))
    if name.startswith(AUTO_PREFIX) and not allow_auto:
        raise CheckpointError("INVALID_ARGS", "names starting with %r are kept for automatic "
                              "checkpoints" % AUTO_PREFIX)
    return name


def model_fingerprint(arch: str, state: Dict[str, torch.Tensor]) -> str:
    """What a checkpoint must match: the architecture and every tensor's name, shape, dtype."""
    digest = hashlib.sha256(arch.encode())
    for key in sorted(state):
        tensor = state[key]
        digest.update(("%s:%s:%s;" % (key, tuple(tensor.shape), tensor.dtype)).encode())
    return digest.hexdigest()[:16]


def describe_identity(identity: Dict[str, Any]) -> str:
    """``torchvision:mobilenet_v3_small (4 classes, 96 px, weights 1a2b...)``."""
    return "%s (%s classes, %s px, weights %s)" % (
        identity.get("builder", "?"), identity.get("num_classes", "?"),
        identity.get("input_size", "?"), identity.get("weights", "?"))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(str(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary sibling, then fsync, rename and fsync the directory."""
    tmp = path.with_name(".%s.%s.tmp" % (path.name, uuid.uuid4().hex[:8]))
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class CheckpointStore:
    """One directory of checkpoints for one model.

    Args:
        directory: created (owner-only) if missing.
        fingerprint: the running model's ``model_fingerprint``; others are refused.
        keep_last: automatic checkpoints kept; operator-named ones stay until deleted.
    """

    def __init__(self, directory: Path, fingerprint: str, keep_last: int = 5,
                 identity: Optional[Dict[str, Any]] = None):
        self.directory = Path(directory)
        self.fingerprint, self.keep_last = fingerprint, keep_last
        self.identity = identity
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError("INTERNAL", "cannot create checkpoint directory %s: %s"
                                  % (self.directory, exc.strerror or exc)) from None
        self.manifest_path = self.directory / "manifest.json"
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files of writes a crash interrupted."""
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink()
            log.info("removed %s, left by an interrupted save", tmp.name)

    def path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    # -- manifest ------------------------------------------------------------------------
    def _read_manifest(self) -> Dict[str, Dict[str, Any]]:
        try:
            data = json.loads(self.manifest_path.read_text())
            return {e["name"]: e for e in data["checkpoints"] if isinstance(e, dict) and
                    isinstance(e.get("name"), str)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("manifest %s unreadable (%s); rebuilding it from the files",
                        self.manifest_path, exc)
            return {}

    def _write_manifest(self, entries: List[Dict[str, Any]]) -> None:
        text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                           "checkpoints": entries}, indent=1).encode()
        _atomic_write(self.manifest_path, lambda handle: handle.write(text))

    def list(self) -> List[Dict[str, Any]]:
        """Every checkpoint on disk, oldest first; the manifest fills in what it knows."""
        manifest = self._read_manifest()
        entries = []
        for file in self.directory.glob("*" + SUFFIX):
            name = file.name[:-len(SUFFIX)]
            entry = manifest.get(name)
            if entry is None:
                entry = self._entry_from_file(file)
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.get("seq", -1), e.get("time", 0)))

    def _entry_from_file(self, file: Path) -> Optional[Dict[str, Any]]:
        """A checkpoint saved just before a crash that kept it out of the manifest."""
        try:
            meta = self._read(file)["meta"]
        except CheckpointError as exc:
            return {"name": file.name[:-len(SUFFIX)], "seq": -1, "time": file.stat().st_mtime,
                    "error": str(exc)}
        return dict(meta, bytes=file.stat().st_size, sha256=None)

    # -- save ----------------------------------------------------------------------------
    def save(self, name: Optional[str], state: Dict[str, Any], meta: Dict[str, Any]) -> Dict:
        """Write ``state`` (tensors and plain containers) under ``name`` (automatic if None)."""
        entries = self.list()
        seq = 1 + max([e.get("seq", 0) for e in entries] + [0])
        auto = name is None
        name = validate_name("%s%06d" % (AUTO_PREFIX, seq) if auto else name, allow_auto=auto)
        meta = dict(meta, name=name, seq=seq, time=time.time(), auto=auto,
                    model_fingerprint=self.fingerprint)
        if self.identity is not None:
            meta["model"] = self.identity
        path = self.path(name)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "state": state}
        _atomic_write(path, lambda handle: torch.save(payload, handle))
        entry = dict(meta, bytes=path.stat().st_size, sha256=sha256_of(path))
        entries = [e for e in entries if e["name"] != name] + [entry]
        entries = self._retain(entries)
        self._write_manifest(entries)
        return entry

    def _retain(self, entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        autos = [e for e in entries if e.get("auto")]
        doomed = {e["name"] for e in autos[:max(0, len(autos) - self.keep_last)]}
        for name in doomed:
            self.path(name).unlink()
        return [e for e in entries if e["name"] not in doomed]

    # -- load ----------------------------------------------------------------------------
    def _read(self, path: Path) -> Dict[str, Any]:
        try:
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError("NOT_FOUND", "no checkpoint %s" % path.name) from None
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle safely is a refusal
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError("CORRUPT", "%s is not a loadable checkpoint (%s: %s)"
                                  % (path.name, type(exc).__name__, first)) from None
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT
                and isinstance(payload.get("meta"), dict) and isinstance(payload.get("state"),
                                                                         dict)):
            raise CheckpointError("CORRUPT", "%s is not a surgeon checkpoint" % path.name)
        return payload

    def load(self, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(state, meta) of a checkpoint that is intact and made for this model."""
        validate_name(name, allow_auto=True)
        path = self.path(name)
        if not path.is_file():
            raise CheckpointError("NOT_FOUND", "no checkpoint named %r in %s"
                                  % (name, self.directory))
        expected = self._read_manifest().get(name, {}).get("sha256")
        if expected and sha256_of(path) != expected:
            raise CheckpointError("CORRUPT", "%s does not match the SHA-256 in the manifest"
                                  % path.name)
        payload = self._read(path)
        meta = payload["meta"]
        theirs = meta.get("model")
        if self.identity is not None and isinstance(theirs, dict) and theirs != self.identity:
            raise CheckpointError("CONFLICT", "checkpoint %r was made for %s; this daemon runs "
                                  "%s" % (name, describe_identity(theirs),
                                          describe_identity(self.identity)))
        if meta.get("model_fingerprint") != self.fingerprint:
            raise CheckpointError("CONFLICT", "checkpoint %r was made for another model (%s, "
                                  "fingerprint %s); this daemon runs fingerprint %s"
                                  % (name, meta.get("arch", "?"), meta.get("model_fingerprint"),
                                     self.fingerprint))
        return payload["state"], meta

    def delete(self, name: str) -> None:
        validate_name(name, allow_auto=True)
        path = self.path(name)
        if not path.is_file():
            raise CheckpointError("NOT_FOUND", "no checkpoint named %r" % name)
        entries = [e for e in self.list() if e["name"] != name]
        path.unlink()
        _fsync_dir(self.directory)
        self._write_manifest(entries)
