"""Where the shared data and weights live: settings first, then ``../shared`` by convention."""

import os
from pathlib import Path
from typing import Optional

from .errors import DataNotFound

SHARED_ENV = "SURGEON_SHARED_DIR"
DATA_ENV = "SURGEON_DATA_DIR"
MODELS_ENV = "SURGEON_MODELS_DIR"
CACHE_ENV = "SURGEON_CACHE_DIR"

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared folder: ``$SURGEON_SHARED_DIR``, else ``../shared`` from the cwd or the repo."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    for candidate in (Path.cwd().parent / "shared", _REPO_ROOT.parent / "shared"):
        if candidate.is_dir():
            return candidate
    return _REPO_ROOT.parent / "shared"


def data_dir() -> Path:
    """CIFAR-10 python-pickle folder (``test_batch``, ``data_batch_1..5``)."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else shared_dir() / "data" / "cifar10"


def models_dir() -> Path:
    """Folder holding the pretrained ``resnet*_cifar10.th`` checkpoints."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else shared_dir() / "models"


def cache_dir() -> Path:
    """Where generated data (CIFAR-10-C) is kept: ``$SURGEON_CACHE_DIR`` or ~/.cache/surgeon."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "surgeon"


def require_file(path: Path, what: str, env_hint: Optional[str] = None) -> Path:
    """Return ``path`` if it is a file, else raise DataNotFound saying how to point at it."""
    if Path(path).is_file():
        return Path(path)
    hint = " (set %s or %s)" % (env_hint, SHARED_ENV) if env_hint else ""
    raise DataNotFound("%s not found at %s%s" % (what, path, hint))
