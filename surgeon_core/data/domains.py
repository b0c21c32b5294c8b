"""A folder of test domains: ``<name>.npy`` image arrays beside one ``labels.npy``.

Two layouts are read, and told apart from the files themselves:

* **stacked**, the released CIFAR-10-C layout: every file holds the same N images at severities
  1..5 one block after another (5 * N rows) and ``labels.npy`` repeats N labels five times;
* **single**: every file holds one set of rows (one severity, or a stream of the user's own),
  ``labels.npy`` has one label per row.

A file of 10,000 rows could be either, so the labels decide: five identical blocks mean stacked.
``layout=`` overrides the guess. The folder is only ever read (memory-mapped), never written, and
``open_domains`` checks every file before any work starts, so a missing or malformed domain is
reported at once instead of after the earlier domains have run.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataNotFound
from .corruptions import CORRUPTIONS

__all__ = ["DomainFolder", "open_domains", "LAYOUTS"]

LAYOUTS = ("auto", "stacked", "single")
LABELS = "labels.npy"


@dataclass(frozen=True)
class DomainFolder:
    folder: Path
    domains: Tuple[str, ...]
    layout: str           # "stacked" or "single"
    rows: int             # images per domain (per severity when stacked)
    image_shape: Tuple[int, int, int]

    def load(self, domain: str, severity: Optional[int],
             limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Images (uint8 NHWC) and int64 labels of ``domain`` (its ``severity`` when stacked)."""
        data = np.load(self.folder / (domain + ".npy"), mmap_mode="r")
        labels = np.load(self.folder / LABELS, mmap_mode="r")
        count = min(limit, self.rows) if limit else self.rows
        start = (severity - 1) * self.rows if self.layout == "stacked" else 0
        block = slice(start, start + count)
        return np.ascontiguousarray(data[block]), np.asarray(labels[block], dtype=np.int64)


def _read(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataNotFound("%s is missing" % path) from None
    except (OSError, ValueError) as exc:
        raise DataNotFound("cannot read %s: %s" % (path, exc)) from None


def _list_domains(folder: Path) -> List[str]:
    """CIFAR-10-C's corruptions in the benchmark's fixed order, then any other names sorted."""
    names = {p.stem for p in folder.glob("*.npy") if p.name != LABELS}
    return [c for c in CORRUPTIONS if c in names] + sorted(names - set(CORRUPTIONS))


def _guess_layout(labels: np.ndarray) -> str:
    if len(labels) % 5:
        return "single"
    blocks = np.asarray(labels).reshape(5, -1)
    return "stacked" if all(np.array_equal(blocks[0], b) for b in blocks[1:]) else "single"


def open_domains(folder: Path, domains: Optional[Sequence[str]] = None,
                 layout: str = "auto") -> DomainFolder:
    """Check the folder's labels and every domain file; the folder, ready to load.

    Raises:
        DataNotFound: a missing folder, file or domain, or arrays of the wrong shape or type.
        ValueError: an unknown layout.
    """
    folder = Path(folder)
    if layout not in LAYOUTS:
        raise ValueError("layout must be one of %s, got %r" % (LAYOUTS, layout))
    if not folder.is_dir():
        raise DataNotFound("domain folder %s does not exist" % folder)
    labels = _read(folder / LABELS)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise DataNotFound("%s must be a 1-D integer array, got %s %s"
                           % (folder / LABELS, labels.dtype, labels.shape))
    available = _list_domains(folder)
    names = list(domains) if domains else available
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise DataNotFound("%s has no domain %s; it holds: %s (a domain is <name>.npy beside "
                           "labels.npy)" % (folder, ", ".join(unknown) or "at all",
                                            ", ".join(available) or "nothing"))
    shape = None
    for name in names:
        data = _read(folder / (name + ".npy"))
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise DataNotFound("%s must be uint8 images (N, H, W, 3), got %s %s"
                               % (folder / (name + ".npy"), data.dtype, data.shape))
        if len(data) != len(labels):
            raise DataNotFound("%s has %d images but %s has %d labels"
                               % (folder / (name + ".npy"), len(data), LABELS, len(labels)))
        shape = shape or tuple(data.shape[1:])
    chosen = _guess_layout(labels) if layout == "auto" else layout
    if chosen == "stacked" and len(labels) % 5:
        raise DataNotFound("%s cannot be the stacked layout: %d rows are not 5 severities"
                           % (folder, len(labels)))
    rows = len(labels) // 5 if chosen == "stacked" else len(labels)
    return DomainFolder(folder, tuple(names), chosen, rows, shape)
