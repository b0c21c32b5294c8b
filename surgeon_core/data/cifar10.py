"""Reader for the CIFAR-10 python-pickle files (``test_batch``, ``data_batch_1`` .. ``_5``)."""

import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .. import paths
from ..errors import DataNotFound

__all__ = ["CLASSES", "load_cifar10", "to_tensor"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SPLITS = {"test": ["test_batch"], "train": ["data_batch_%d" % i for i in range(1, 6)]}


def _read_batch(path: Path) -> Tuple[np.ndarray, List[int]]:
    if not path.is_file():
        raise DataNotFound("CIFAR-10 file %s is missing (set %s or %s to the folder holding it)"
                           % (path, paths.DATA_ENV, paths.SHARED_ENV))
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = list(batch["labels"])
    except Exception as exc:  # a damaged pickle raises any of several types
        raise DataNotFound("CIFAR-10 file %s is damaged or not a CIFAR batch: %s"
                           % (path, exc)) from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataNotFound("CIFAR-10 file %s has data of shape %s and %d labels; expected (N, 3072)"
                           % (path, data.shape, len(labels)))
    return data, labels


def load_cifar10(split: str = "test", root: Optional[Path] = None,
                 limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images as uint8 NHWC (N, 32, 32, 3) and int64 labels, in file order.

    Raises:
        DataNotFound: the folder or a file is missing or damaged (the message says which).
        ValueError: an unknown split.
    """
    if split not in _SPLITS:
        raise ValueError("split must be one of %s, got %r" % (tuple(_SPLITS), split))
    root = Path(root) if root is not None else paths.data_dir()
    images, labels = [], []
    for name in _SPLITS[split]:
        data, lab = _read_batch(root / name)
        images.append(data)
        labels.extend(lab)
        if limit is not None and sum(len(i) for i in images) >= limit:
            break
    x = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(labels, dtype=np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return np.ascontiguousarray(x), y


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [0, 1] (the models normalise inside)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)
