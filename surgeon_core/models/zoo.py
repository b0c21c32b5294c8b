"""Model names, weight-file metadata and safe loading (``weights_only=True``, never code)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Optional

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
        raise KeyError("no published weights for %r (published: %s); pass your own file "
                       "(--weights FILE, or model.weights in the daemon's config)"
                       % (arch, ", ".join(CIFAR_WEIGHTS)))
    return paths.models_dir() / CIFAR_WEIGHTS[arch].filename


def sha256_of(path: Path, opener: Callable[[Path], BinaryIO] = lambda p: open(p, "rb")) -> str:
    """The file's SHA-256; ``opener`` decides how it is opened (the daemon opens regular files
    only)."""
    digest = hashlib.sha256()
    with opener(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without executing code.

    Accepts a state dict, or a dict holding one under ``state_dict``, ``model_state_dict`` or
    ``model`` (training scripts, Lightning); strips the ``module.`` prefix of DataParallel and,
    when every key has it, ``model.`` (Lightning) or ``_orig_mod.`` (torch.compile).
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise IncompatibleModel("cannot read weights %s safely (%s: %s); save "
                                "model.state_dict() with torch.save, not the model object"
                                % (path, type(exc).__name__, first)) from None
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise IncompatibleModel("weights %s hold %s, not a state dict (a dict of tensors, or one "
                                "under state_dict / model_state_dict / model)"
                                % (path, "an empty dict" if obj == {} else type(obj).__name__))
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise IncompatibleModel("weights %s hold no tensors under string keys" % path)
    return _strip_prefixes(tensors)


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for prefix in _PREFIXES[1:]:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def weights_mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``state`` does not fit ``model`` (first keys and both shapes), or None if it fits."""
    own = model.state_dict()
    # old checkpoints predate BatchNorm's batch counter, which load_state_dict fills in
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = ["%s: file %s, model %s" % (k, tuple(state[k].shape), tuple(own[k].shape))
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        parts.append("%d shape(s) differ: %s" % (len(shapes), "; ".join(shapes[:3])))
    if missing:
        parts.append("%d key(s) missing from the file: %s" % (len(missing), ", ".join(missing[:3])))
    if unexpected:
        parts.append("%d key(s) the model lacks: %s" % (len(unexpected),
                                                         ", ".join(unexpected[:3])))
    hint = _num_classes_hint(own, state)
    return "; ".join(parts) + (hint or "")


def _num_classes_hint(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> str:
    """When only the classifier's output size differs, say which num_classes fits the file."""
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not differ or any(k not in own for k in state):
        return ""
    sizes = {int(state[k].shape[0]) for k in differ if state[k].dim() >= 1}
    same_rest = all(state[k].shape[1:] == own[k].shape[1:] for k in differ)
    if len(sizes) == 1 and same_rest:
        size = sizes.pop()
        return " (the file's classifier has %d outputs: set num_classes to %d)" % (size, size)
    return ""


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly; IncompatibleModel names the mismatched keys."""
    state = load_state_dict_file(path)
    problem = weights_mismatch(model, state)
    if problem:
        raise IncompatibleModel("weights %s do not fit %s: %s"
                                % (path, type(model).__name__, problem))
    model.load_state_dict(state, strict=False)  # checked above, counters aside
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
