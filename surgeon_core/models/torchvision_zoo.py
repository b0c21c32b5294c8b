"""torchvision's classifiers by name, with their published preprocessing and weights.

Everything comes from torchvision's own registry (``list_models``, ``get_model``,
``get_model_weights`` and the weights enums' ``transforms()`` and ``meta``), which torchvision 0.14
(JetPack 5's L4T image) already has; nothing here is a hand-written table of it.
"""

import difflib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from torch import nn

from ..errors import SurgeonError

__all__ = ["TorchvisionError", "classifier_names", "build", "published_weights",
           "published_preprocessing", "fetch_published_state", "close_matches"]


class TorchvisionError(SurgeonError, ValueError):
    """An unknown name, a task surgeon does not adapt, or published weights out of reach."""


def _models():
    try:
        import torchvision.models as models
    except ImportError as exc:
        raise TorchvisionError("torchvision is not installed (%s); install the torch extra, or "
                               "on a Jetson NVIDIA's torchvision wheel" % exc) from None
    return models


def classifier_names() -> List[str]:
    """Image classifiers (torchvision.models' own namespace: no detection or segmentation)."""
    models = _models()
    return sorted(models.list_models(module=models))


def _other_task(name: str) -> Optional[str]:
    models = _models()
    for task in ("detection", "segmentation", "optical_flow", "video", "quantization"):
        module = getattr(models, task, None)
        if module is not None and name in models.list_models(module=module):
            return task
    return None


def close_matches(name: str, known: List[str]) -> str:
    near = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    return (" Did you mean %s?" % ", ".join(near)) if near else ""


def check_name(name: str) -> None:
    if name in classifier_names():
        return
    task = _other_task(name)
    if task:
        raise TorchvisionError("torchvision:%s is a %s model; surgeon adapts image classifiers "
                               "only (see docs/MODELS.md)" % (name, task))
    raise TorchvisionError("torchvision has no classifier %r.%s (torchvision %s; list: "
                           "python -c 'import torchvision; print(torchvision.models.list_models("
                           "torchvision.models))')"
                           % (name, close_matches(name, classifier_names()), _version()))


def _version() -> str:
    import torchvision

    return torchvision.__version__


def build(name: str, num_classes: Optional[int], kwargs: Dict[str, Any]) -> nn.Module:
    """The architecture with fresh weights (weights are loaded by the caller)."""
    check_name(name)
    options = dict(kwargs)
    if num_classes is not None:
        options["num_classes"] = num_classes
    try:
        return _models().get_model(name, weights=None, **options)
    except (TypeError, ValueError) as exc:
        raise TorchvisionError("torchvision:%s cannot be built with %s: %s"
                               % (name, options or "its defaults", exc)) from None


def published_weights(name: str, tag: str = "DEFAULT"):
    """The weights enum entry ``tag`` (``DEFAULT``, ``IMAGENET1K_V1``, ...) of ``name``."""
    check_name(name)
    enum = _models().get_model_weights(name)
    try:
        return enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        known = ["DEFAULT"] + [w.name for w in enum]
        raise TorchvisionError("torchvision:%s has no published weights %r; known: %s"
                               % (name, tag, ", ".join(known))) from None


def published_preprocessing(weights) -> Dict[str, Any]:
    """resize, crop, mean, std and interpolation of a weights entry's evaluation transform."""
    transform = weights.transforms()
    return {"resize": int(transform.resize_size[0]), "crop": int(transform.crop_size[0]),
            "mean": tuple(float(v) for v in transform.mean),
            "std": tuple(float(v) for v in transform.std),
            "interpolation": transform.interpolation.value}


def published_categories(weights) -> Optional[List[str]]:
    categories = weights.meta.get("categories")
    return list(categories) if categories else None


def _cache_path(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_published_state(weights) -> Path:
    """The published weights file, from torch's hub cache or downloaded into it once."""
    import torch

    path = _cache_path(weights.url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(path), progress=False)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError, hash mismatch
        raise TorchvisionError(
            "cannot download torchvision's published weights %s (%s: %s); on a machine without "
            "internet, fetch %s elsewhere and put it at %s, or set the weights to a file"
            % (weights, type(exc).__name__, exc, weights.url, path)) from None
    return path
