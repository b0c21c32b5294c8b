"""CIFAR-10-C on disk in the released layout, generated from the CIFAR-10 test set when missing.

Layout (the released CIFAR-10-C files): ``<corruption>.npy`` uint8 (5*N, 32, 32, 3) with severities
1..5 stacked in order, each block the same N test images in file order, and ``labels.npy`` (5*N,).
A folder of the released files can be used as it is; a generated folder records its seed and image
count in ``manifest.json`` so that a cache made for other settings is never silently reused.
"""

import json
import logging
import multiprocessing
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from ..errors import DataNotFound
from .cifar10 import load_cifar10
from .corruptions import CORRUPTIONS, corrupt

__all__ = ["build_cifar10c", "load_corruption"]

logger = logging.getLogger(__name__)
_MANIFEST = "manifest.json"


def _manifest(folder: Path) -> dict:
    path = folder / _MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _generate(job: Tuple[np.ndarray, str, int, int]) -> Tuple[str, int, np.ndarray]:
    images, name, severity, seed = job
    return name, severity, corrupt(images, name, severity, seed)


def _save(target: Path, blocks) -> None:
    tmp = target.with_name(target.stem + ".tmp.npy")
    np.save(tmp, np.concatenate([blocks[s] for s in range(1, 6)]))
    tmp.replace(target)  # a crash never leaves a half-written file under the real name


class _Serial:
    """A stand-in for a process pool when one worker is asked for."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def _pool(workers: int, jobs: int):
    if workers > 1 and jobs > 1:
        return multiprocessing.get_context("spawn").Pool(min(workers, jobs))
    return _Serial()


def build_cifar10c(folder: Path, corruptions: Iterable[str] = CORRUPTIONS,
                   limit: Optional[int] = None, seed: int = 0,
                   data_root: Optional[Path] = None, workers: int = 1) -> Path:
    """Generate the missing ``<corruption>.npy`` files (all five severities) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corruptions = list(corruptions)
    made = _manifest(folder)
    complete = all((folder / ("%s.npy" % n)).is_file() for n in corruptions) and \
        (folder / "labels.npy").is_file()
    if complete and made.get("seed") == seed and made.get("images") == min(limit or 10000, 10000):
        return folder   # nothing to make: the clean test set is not needed
    images, labels = load_cifar10("test", root=data_root, limit=limit)
    wanted = {"seed": seed, "images": int(len(images))}
    manifest = _manifest(folder)
    if manifest and {k: manifest.get(k) for k in wanted} != wanted:
        raise DataNotFound("%s holds CIFAR-10-C made with %s, not %s; use another --corruption-dir"
                           % (folder, {k: manifest.get(k) for k in wanted}, wanted))
    names = [n for n in corruptions if not (folder / ("%s.npy" % n)).is_file()]
    jobs = [(images, name, severity, seed) for name in names for severity in range(1, 6)]
    if jobs:
        logger.info("generating %d corruptions (5 severities x %d images) into %s",
                    len(names), len(images), folder)
    blocks: Dict[str, Dict[int, np.ndarray]] = {name: {} for name in names}
    with _pool(workers, len(jobs)) as pool:
        for name, severity, out in pool.imap_unordered(_generate, jobs):
            blocks[name][severity] = out
            if len(blocks[name]) == 5:
                _save(folder / ("%s.npy" % name), blocks.pop(name))
                logger.info("generated %s", name)
    if not (folder / "labels.npy").is_file():
        np.save(folder / "labels.npy", np.tile(labels.astype(np.uint8), 5))
    (folder / _MANIFEST).write_text(json.dumps({**manifest, **wanted, "generator": "surgeon"}))
    return folder


def load_corruption(folder: Path, name: str, severity: int,
                    limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of one corruption at one severity from ``folder``.

    Raises:
        DataNotFound: the file is missing, unreadable, or not in the released layout.
        ValueError: a severity outside 1..5 or an unknown corruption.
    """
    if name not in CORRUPTIONS:
        raise ValueError("unknown corruption %r; known: %s" % (name, ", ".join(CORRUPTIONS)))
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError("severity must be 1..5, got %r" % (severity,))
    folder = Path(folder)
    try:
        data = np.load(folder / ("%s.npy" % name), mmap_mode="r")
        labels = np.load(folder / "labels.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataNotFound("cannot read CIFAR-10-C %s from %s: %s" % (name, folder, exc)) from exc
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(data) % 5 or len(labels) != len(data):
        raise DataNotFound("%s/%s.npy has shape %s with %d labels; expected (5*N, 32, 32, 3)"
                           % (folder, name, data.shape, len(labels)))
    n = len(data) // 5
    block = slice((severity - 1) * n, (severity - 1) * n + (min(limit, n) if limit else n))
    return np.ascontiguousarray(data[block]), np.asarray(labels[block], dtype=np.int64)
