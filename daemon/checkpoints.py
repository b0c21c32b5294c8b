"""Checkpoints of the learner's state: atomic writes, safe loads, a manifest, retention.

NOTE [Checkpoint durability]
A checkpoint is written to a temporary file in its own directory, flushed and fsynced, renamed
over its final name and the directory fsynced, so a crash (kill -9, power loss) leaves either
the old file or the new one, never a torn one. The manifest (``manifest.json``) is written the
same way after the checkpoint; a crash between the two leaves a checkpoint the manifest does
not list yet, so listing also reads the metadata embedded in every file and the manifest is
only an index (with each file's SHA-256, checked on load). Order is a sequence number, not the
wall clock: a Jetson without a battery-backed clock boots in 1970 until NTP answers.

The file name on disk is a checkpoint's identity (a copy, ``cp auto-000001.pt keep.pt``, is a
named checkpoint ``keep``, whatever its embedded metadata says). Saves and deletes are
serialised within the process, and ``acquire`` takes an flock on the directory so that a second
daemon cannot write there. Only regular files are opened, without following links or blocking
(daemon/safefiles.py), and a directory other users can write is refused: they could plant a
checkpoint this daemon would resume from.

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
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from surgeon_core.errors import SurgeonError
from surgeon_core.models.zoo import sha256_of

from .safefiles import (DirectoryLock, LockHeld, NotRegular, describe_os_error, open_regular,
                        regular_files, unsafe_directory)

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


def _sha256(path: Path) -> str:
    return sha256_of(path, open_regular)


def storage_error(action: str, exc: OSError, intact: bool = True) -> CheckpointError:
    """Disk full, read-only and permission problems get their own code and words."""
    return CheckpointError("STORAGE", "cannot %s: %s (%s)%s" % (
        action, describe_os_error(exc), exc,
        "; the checkpoints already saved are intact" if intact else ""))


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
            raise storage_error("create checkpoint directory %s" % self.directory, exc,
                                intact=False) from None
        why = unsafe_directory(self.directory)
        if why is not None:
            raise CheckpointError("FORBIDDEN", "checkpoint directory refused: %s; another user "
                                  "could plant a checkpoint this daemon would resume" % why)
        self.manifest_path = self.directory / "manifest.json"
        self._writing = threading.RLock()
        self._owner: Optional[DirectoryLock] = None
        self._remove_leftovers()

    def acquire(self) -> None:
        """Become the directory's only writer (until ``release`` or the process ends)."""
        if self._owner is not None:
            return
        try:
            self._owner = DirectoryLock(self.directory / ".lock")
        except LockHeld as exc:
            raise CheckpointError("CONFLICT", "checkpoint directory %s is in use by another "
                                  "daemon (%s)" % (self.directory, "pid %s" % exc.owner
                                                   if exc.owner else "lock held")) from None
        except OSError as exc:
            raise storage_error("lock %s" % self.directory, exc) from None

    def release(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def _remove_leftovers(self) -> None:
        """Temporary files of writes a crash interrupted (links are removed, not followed)."""
        for tmp in self.directory.glob(".*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                continue
            log.info("removed %s, left by an interrupted save", tmp.name)

    def path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    # -- manifest ------------------------------------------------------------------------
    def _read_manifest(self) -> Dict[str, Dict[str, Any]]:
        try:
            with open_regular(self.manifest_path) as handle:
                data = json.loads(handle.read(64 << 20).decode("utf-8"))
            return {e["name"]: e for e in data["checkpoints"] if isinstance(e, dict) and
                    isinstance(e.get("name"), str)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("manifest %s unreadable (%s); rebuilding it from the files",
                        self.manifest_path, exc)
            return {}

    def _write_manifest(self, entries: List[Dict[str, Any]]) -> None:
        text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                           "checkpoints": entries}, indent=1).encode()
        _atomic_write(self.manifest_path, lambda handle: handle.write(text))

    def list(self) -> List[Dict[str, Any]]:
        """Every checkpoint on disk, oldest first; the manifest fills in what it knows. The
        name and kind (automatic or named) come from the file's name, never from inside it."""
        manifest = self._read_manifest()
        entries = []
        for filename, regular in regular_files(self.directory, SUFFIX):
            name = filename[:-len(SUFFIX)]
            if not _NAME.match(name):
                continue
            entry = manifest.get(name) if regular else None
            if entry is None:
                entry = self._entry_from_file(self.directory / filename, regular)
            entries.append(dict(entry, name=name, auto=name.startswith(AUTO_PREFIX)))
        return sorted(entries, key=lambda e: (e.get("seq", -1), e.get("time", 0)))

    def _entry_from_file(self, file: Path, regular: bool) -> Dict[str, Any]:
        """A checkpoint saved just before a crash that kept it out of the manifest, or a copy."""
        try:
            if not regular:
                raise CheckpointError("CORRUPT", "%s is not a regular file" % file.name)
            meta = self._read(file)["meta"]
            return dict(meta, bytes=file.stat().st_size, sha256=None)
        except (CheckpointError, OSError) as exc:
            return {"seq": -1, "time": 0, "error": str(exc)}

    # -- save ----------------------------------------------------------------------------
    def save(self, name: Optional[str], state: Dict[str, Any], meta: Dict[str, Any]) -> Dict:
        """Write ``state`` (tensors and plain containers) under ``name`` (automatic if None).
        A failure (disk full, read-only) leaves the directory as it was: STORAGE error."""
        with self._writing:
            try:
                return self._save(name, state, meta)
            except OSError as exc:
                raise storage_error("save checkpoint", exc) from None

    def _save(self, name: Optional[str], state: Dict[str, Any], meta: Dict[str, Any]) -> Dict:
        entries = self.list()
        seq = 1 + max([e.get("seq", 0) for e in entries] + [0])
        auto = name is None
        name = validate_name("%s%06d" % (AUTO_PREFIX, seq) if auto else name, allow_auto=auto)
        meta = dict(meta, name=name, seq=seq, time=time.time(), auto=auto,
                    model_fingerprint=self.fingerprint)
        if self.identity is not None:
            meta["model"] = self.identity
        path = self.path(name)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise CheckpointError("CONFLICT", "%s exists and is not a regular file" % path.name)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "state": state}
        backup = self._backup(path)
        try:
            _atomic_write(path, lambda handle: torch.save(payload, handle))
            entry = dict(meta, bytes=path.stat().st_size, sha256=_sha256(path))
            kept, doomed = self._retain([e for e in entries if e["name"] != name] + [entry])
            self._write_manifest(kept)
        except BaseException:
            # the directory as it was: no file the manifest does not know, no lost old one
            if backup is not None:
                self._restore(backup, path)
            elif path.is_file():
                path.unlink()
            raise
        if backup is not None:
            backup.unlink()
        for doomed_name in doomed:  # only once the manifest no longer lists them
            self._unlink(doomed_name)
        return entry

    @staticmethod
    def _restore(backup: Path, path: Path) -> None:
        # rename(2) between two links to one file does nothing: the write never replaced it
        if path.is_file() and os.path.samefile(str(backup), str(path)):
            backup.unlink()
        else:
            os.replace(str(backup), str(path))

    @staticmethod
    def _backup(path: Path) -> Optional[Path]:
        """A hard link to a checkpoint about to be overwritten (a leftover if we crash)."""
        if not path.is_file():
            return None
        backup = path.with_name(".%s.%s.old.tmp" % (path.name, uuid.uuid4().hex[:8]))
        os.link(str(path), str(backup))
        return backup

    def _retain(self, entries: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[str]]:
        """(entries kept, automatic names to delete beyond keep_last)."""
        autos = [e for e in entries if e.get("auto")]
        doomed = [e["name"] for e in autos[:max(0, len(autos) - self.keep_last)]]
        return [e for e in entries if e["name"] not in doomed], doomed

    def _unlink(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    # -- load ----------------------------------------------------------------------------
    def _read(self, path: Path) -> Dict[str, Any]:
        try:
            with open_regular(path) as handle:
                payload = torch.load(handle, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError("NOT_FOUND", "no checkpoint %s" % path.name) from None
        except NotRegular as exc:
            raise CheckpointError("CORRUPT", str(exc)) from None
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
        if not os.path.lexists(str(path)):
            raise CheckpointError("NOT_FOUND", "no checkpoint named %r in %s"
                                  % (name, self.directory))
        expected = self._read_manifest().get(name, {}).get("sha256")
        try:
            actual = _sha256(path) if expected else None
        except NotRegular as exc:
            raise CheckpointError("CORRUPT", str(exc)) from None
        except OSError as exc:
            raise storage_error("read %s" % path.name, exc) from None
        if expected and actual != expected:
            raise CheckpointError("CORRUPT", "%s does not match the SHA-256 in the manifest"
                                  % path.name)
        payload = self._read(path)
        meta = dict(payload["meta"], name=name)
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
        with self._writing:
            if not os.path.lexists(str(path)):
                raise CheckpointError("NOT_FOUND", "no checkpoint named %r" % name)
            try:
                entries = [e for e in self.list() if e["name"] != name]
                path.unlink()
                _fsync_dir(self.directory)
                self._write_manifest(entries)
            except OSError as exc:
                raise storage_error("delete checkpoint %s" % name, exc) from None
