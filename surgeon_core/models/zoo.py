"""Model names, weight-file metadata and safe loading (``weights_only=True``, never code)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import paths
from ..errors import IncompatibleModel
from . import cifar_resnet


@dataclass(frozen=True)
class WeightsInfo:
    """What a published weights file is, so a wrong or damaged file is caught before use."""

    filename: str
    sha256: str
    num_params: int
    clean_accuracy: float  # percent on the CIFAR-10 test set, measured


CIFAR_WEIGHTS: Dict[str, WeightsInfo] = {
    "resnet20": WeightsInfo("resnet20_cifar10.th",
                            "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
                            269_722, 91.73),
    "resnet56": WeightsInfo("resnet56_cifar10.th",
                            "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
                            853_018, 93.39),
}

CIFAR_ARCHS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": cifar_resnet.resnet20, "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44, "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
}


def default_weights_path(arch: str) -> Path:
    """Where the published checkpoint for ``arch`` lives (``$SURGEON_MODELS_DIR`` or ../shared)."""
    if arch not in CIFAR_WEIGHTS:
        raise KeyError("no published weights for %r; known: %s" % (arch, ", ".join(CIFAR_WEIGHTS)))
    return paths.models_dir() / CIFAR_WEIGHTS[arch].filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without executing code; unwrap ``state_dict`` and ``module.`` prefixes."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        raise IncompatibleModel("cannot read weights %s safely: %s" % (path, exc)) from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise IncompatibleModel("weights %s hold a %s, not a state dict"
                                % (path, type(obj).__name__))
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly, with a message naming the mismatched keys."""
    state = load_state_dict_file(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise IncompatibleModel(
            "weights %s do not fit %s: missing %s, unexpected %s"
            % (path, type(model).__name__, result.missing_keys[:5], result.unexpected_keys[:5]))
    return model


def cifar_resnet_by_name(arch: str, weights: Optional[Path] = None, **kwargs) -> nn.Module:
    """Build a CIFAR ResNet by name, optionally loading a checkpoint; eval mode."""
    if arch not in CIFAR_ARCHS:
        raise KeyError("unknown CIFAR arch %r; known: %s" % (arch, ", ".join(CIFAR_ARCHS)))
    model = CIFAR_ARCHS[arch](**kwargs)
    if weights is not None:
        paths.require_file(Path(weights), "weights for %s" % arch, paths.MODELS_ENV)
        load_weights(model, Path(weights))
    return model.eval()
