"""The user's model, from a spec to a checked, ready module: ``build_model(ModelSpec(...))``.

Architectures (``arch``):

    cifar:resnet20          the bundled CIFAR ResNets (resnet20/32/44/56/110; bare names work too)
    torchvision:NAME        any torchvision image classifier (mobilenet_v3_large, resnet50, ...)
    python:pkg.mod:build    a callable returning an nn.Module (kwargs from ``kwargs``)

Weights (``weights``): a file holding a state dict (or one under ``state_dict``,
``model_state_dict`` or ``model``; ``module.`` prefixes stripped), ``torchvision:TAG``
(``DEFAULT``, ``IMAGENET1K_V1``, ...) for torchvision's published weights, or ``random`` (a fresh
initialisation, seeded: for measuring memory and speed, never for serving). Preprocessing defaults
come from the architecture: CIFAR models squash to 32 x 32 as they always have; torchvision names
take their published evaluation transform; ``python:`` models must state their input size.

Every mistake raises ModelSpecError with a message that names the fix; ``build_model`` also runs one
dummy batch at the input size, so a model that cannot take it is refused before any frame.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import paths
from ..data.cifar10 import CLASSES as CIFAR10_CLASSES
from ..errors import DataNotFound, IncompatibleModel, SurgeonError
from . import factory, torchvision_zoo
from .cifar_resnet import IMAGENET_MEAN, IMAGENET_STD
from .labels import LabelsError, load_labels
from .preprocess import Preprocessing, attach_normalization
from .zoo import CIFAR_ARCHS, default_weights_path, load_weights

__all__ = ["ModelSpecError", "ModelSpec", "BuiltModel", "build_model", "parse_arch",
           "state_fingerprint", "KINDS"]

KINDS = ("cifar", "torchvision", "python")
_TV_WEIGHTS = "torchvision:"
RANDOM = "random"


class ModelSpecError(SurgeonError, ValueError):
    """The model cannot be built as specified; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """What the user wrote. ``None`` preprocessing fields take the architecture's defaults."""

    arch: str = "cifar:resnet20"
    num_classes: Optional[int] = None
    weights: Optional[str] = None
    labels: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    python_path: Tuple[str, ...] = ()
    crop: Optional[int] = None
    resize: Optional[int] = None
    mode: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: Optional[str] = None


@dataclass
class BuiltModel:
    """A model ready to serve and adapt, with what it expects and who it is."""

    model: nn.Module
    kind: str
    name: str
    num_classes: int
    preprocessing: Preprocessing
    class_names: Optional[List[str]]
    weights: str                  # where the weights came from
    identity: Dict[str, Any]      # builder, num_classes, input_size, weights fingerprint

    @property
    def builder(self) -> str:
        return self.identity["builder"]


def parse_arch(arch: str) -> Tuple[str, str]:
    """``"torchvision:resnet18"`` -> ("torchvision", "resnet18"); bare CIFAR names -> cifar."""
    text = (arch or "").strip()
    kind, sep, name = text.partition(":")
    if sep and kind in KINDS and name.strip():
        return kind, name.strip()
    if not sep and text in CIFAR_ARCHS:
        return "cifar", text
    if sep and kind not in KINDS:
        raise ModelSpecError("model arch %r: unknown kind %r; write cifar:NAME, torchvision:NAME "
                             "or python:package.module:callable" % (arch, kind))
    hint = ""
    try:
        if text in torchvision_zoo.classifier_names():
            hint = " Did you mean torchvision:%s?" % text
    except SurgeonError:
        pass
    raise ModelSpecError("model arch %r: write cifar:NAME (%s), torchvision:NAME (any torchvision "
                         "classifier) or python:package.module:callable.%s"
                         % (arch, "/".join(CIFAR_ARCHS), hint or torchvision_zoo.close_matches(
                             text, list(CIFAR_ARCHS))))


def build_model(spec: ModelSpec, check_forward: bool = True) -> BuiltModel:
    """Build, load and check the model ``spec`` describes (on the CPU, eval mode)."""
    kind, name = parse_arch(spec.arch)
    _check_values(spec)
    names = _labels(spec)
    published = _published(kind, name, spec.weights)
    num_classes = _num_classes(spec, names, published)
    pre = _preprocessing(kind, spec, published)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)   # a fresh initialisation is the same in every run
        model = _architecture(kind, name, spec, num_classes, pre)
    source = _load(kind, name, spec, model, published)
    if kind != "cifar" and pre.mean is not None:
        attach_normalization(model, pre.mean, pre.std)
    model.eval()
    outputs = _check_forward(model, pre.crop, spec.arch) if check_forward else num_classes
    if num_classes is not None and outputs != num_classes:
        raise ModelSpecError("%s returns %d classes, but num_classes is %d"
                             % (spec.arch, outputs, num_classes))
    if names is not None and outputs != len(names):
        raise ModelSpecError("%s returns %d classes but labels file %s names %d; give one name "
                             "per class" % (spec.arch, outputs, spec.labels, len(names)))
    num_classes = outputs
    names = names or _default_names(kind, num_classes, published)
    identity = {"builder": _builder(kind, name, spec.kwargs), "num_classes": num_classes,
                "input_size": pre.crop, "weights": state_fingerprint(model)}
    return BuiltModel(model, kind, name, num_classes, pre, names, source, identity)


def _check_values(spec: ModelSpec) -> None:
    if spec.num_classes is not None and spec.num_classes < 1:
        raise ModelSpecError("num_classes must be >= 1, got %r" % (spec.num_classes,))
    if not isinstance(spec.kwargs, dict):
        raise ModelSpecError("model kwargs must be a mapping, got %r" % (spec.kwargs,))


def _labels(spec: ModelSpec) -> Optional[List[str]]:
    if not spec.labels:
        return None
    try:
        names = load_labels(Path(spec.labels))
    except LabelsError as exc:
        raise ModelSpecError(str(exc)) from None
    if spec.num_classes is not None and spec.num_classes != len(names):
        raise ModelSpecError("num_classes is %d but labels file %s names %d classes; make them "
                             "agree (or leave num_classes out: it follows the labels)"
                             % (spec.num_classes, spec.labels, len(names)))
    return names


def _published(kind: str, name: str, weights: Optional[str]):
    """torchvision's weights entry whose transform and categories are the defaults."""
    if kind != "torchvision":
        if weights and weights.startswith(_TV_WEIGHTS):
            raise ModelSpecError("weights %s are torchvision's; only torchvision:NAME models can "
                                 "use them" % weights)
        return None
    try:
        tag = weights[len(_TV_WEIGHTS):] if weights and weights.startswith(_TV_WEIGHTS) \
            else "DEFAULT"
        return torchvision_zoo.published_weights(name, tag or "DEFAULT")
    except torchvision_zoo.TorchvisionError as exc:
        raise ModelSpecError(str(exc)) from None


def _num_classes(spec: ModelSpec, names, published) -> Optional[int]:
    if spec.num_classes is not None:
        return spec.num_classes
    if names is not None:
        return len(names)
    if spec.weights and spec.weights.startswith(_TV_WEIGHTS) and published is not None:
        categories = torchvision_zoo.published_categories(published)
        return len(categories) if categories else None
    return None


def _preprocessing(kind: str, spec: ModelSpec, published) -> Preprocessing:
    if kind == "cifar":
        base: Dict[str, Any] = {"crop": 32, "mode": "squash", "mean": IMAGENET_MEAN,
                                "std": IMAGENET_STD}
    elif kind == "torchvision":
        base = dict(torchvision_zoo.published_preprocessing(published), mode="crop")
    else:
        if spec.crop is None:
            raise ModelSpecError("python: models must state their input size: set "
                                 "preprocess.crop (e.g. 224)")
        base = {"crop": spec.crop, "mode": "crop"}
    given = {k: getattr(spec, k) for k in ("crop", "resize", "mode", "mean", "std",
                                           "interpolation") if getattr(spec, k) is not None}
    if "crop" in given and "resize" not in given:
        ratio = base.get("resize", round(base["crop"] / 0.875)) / base["crop"]
        given["resize"] = int(round(given["crop"] * ratio))
    merged = dict(base, **given)
    if merged["mode"] == "crop" and merged.get("resize") is None:
        merged["resize"] = int(round(merged["crop"] / 0.875))
    for key in ("mean", "std"):
        if merged.get(key) is not None:
            merged[key] = tuple(float(v) for v in merged[key])
            if len(merged[key]) != 3:
                raise ModelSpecError("preprocess.%s needs 3 values (R, G, B), got %s"
                                     % (key, list(merged[key])))
    try:
        return Preprocessing(**merged)
    except ValueError as exc:
        raise ModelSpecError("preprocess: %s" % exc) from None


def _architecture(kind: str, name: str, spec: ModelSpec, num_classes: Optional[int],
                  pre: Preprocessing) -> nn.Module:
    try:
        if kind == "cifar":
            return _cifar(name, spec, num_classes, pre)
        if kind == "torchvision":
            return torchvision_zoo.build(name, num_classes, spec.kwargs)
        fn = factory.load_factory(name, spec.python_path)
        return factory.call_factory(name, fn, spec.kwargs, num_classes)
    except (torchvision_zoo.TorchvisionError, factory.FactoryError) as exc:
        raise ModelSpecError(str(exc)) from None


def _cifar(name: str, spec: ModelSpec, num_classes: Optional[int],
           pre: Preprocessing) -> nn.Module:
    if name not in CIFAR_ARCHS:
        raise ModelSpecError("unknown CIFAR architecture %r (known: %s).%s" % (
            name, ", ".join(CIFAR_ARCHS), torchvision_zoo.close_matches(name, list(CIFAR_ARCHS))))
    options = dict(spec.kwargs)
    if num_classes is not None:
        options["num_classes"] = num_classes
    mean, std = (pre.mean, pre.std) if pre.mean is not None else ((0.0,) * 3, (1.0,) * 3)
    try:
        return CIFAR_ARCHS[name](mean=mean, std=std, **options)
    except TypeError as exc:
        raise ModelSpecError("cifar:%s cannot be built with %s: %s" % (name, options, exc)) \
            from None


def _load(kind: str, name: str, spec: ModelSpec, model: nn.Module, published) -> str:
    """Load the weights; returns where they came from."""
    weights = spec.weights
    if weights == RANDOM:
        return "random (a fresh initialisation)"
    if weights and weights.startswith(_TV_WEIGHTS):
        try:
            path = torchvision_zoo.fetch_published_state(published)
        except torchvision_zoo.TorchvisionError as exc:
            raise ModelSpecError(str(exc)) from None
        _load_file(model, path, spec.arch)
        return "%s%s" % (_TV_WEIGHTS, published.name)
    if not weights:
        if kind == "python":
            return "the factory's own"
        if kind == "torchvision":
            raise ModelSpecError("torchvision:%s needs weights: your fine-tuned file (weights: "
                                 "/path/to/model.pt) or torchvision's published ones (weights: "
                                 "torchvision:DEFAULT, downloaded once into torch's hub cache)"
                                 % name)
        try:
            weights = str(default_weights_path(name))
        except KeyError as exc:
            raise ModelSpecError("cifar:%s: %s" % (name, exc.args[0])) from None
    _load_file(model, Path(weights), spec.arch)
    return str(weights)


def _load_file(model: nn.Module, path: Path, arch: str) -> None:
    try:
        paths.require_file(path, "weights for %s" % arch, paths.MODELS_ENV)
        load_weights(model, path)
    except (DataNotFound, IncompatibleModel) as exc:
        raise ModelSpecError(str(exc)) from None


def _check_forward(model: nn.Module, size: int, arch: str) -> int:
    """Run one dummy batch at the input size; the number of classes it returns."""
    x = torch.full((1, 3, size, size), 0.5)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelSpecError("%s cannot run on a %d x %d input (%s: %s); set preprocess.crop to "
                             "the size it was built for, or pass the size in model.kwargs "
                             "(e.g. image_size for ViT)" % (arch, size, size, type(exc).__name__,
                                                            first)) from None
    if not isinstance(out, torch.Tensor):
        raise ModelSpecError("%s returns a %s, not a tensor of logits; surgeon adapts image "
                             "classifiers (wrap the model so that forward returns logits)"
                             % (arch, type(out).__name__))
    if out.dim() != 2 or out.shape[0] != 1:
        raise ModelSpecError("%s returns shape %s for one image; surgeon needs logits of shape "
                             "(batch, classes): detection and segmentation heads are not "
                             "supported" % (arch, tuple(out.shape)))
    if not bool(torch.isfinite(out).all()):
        raise ModelSpecError("%s returns non-finite logits on a grey image; check the weights"
                             % arch)
    return int(out.shape[1])


def _default_names(kind: str, num_classes: int, published) -> Optional[List[str]]:
    if kind == "cifar" and num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    if published is not None:
        categories = torchvision_zoo.published_categories(published)
        if categories and len(categories) == num_classes:
            return categories
    return None


def _builder(kind: str, name: str, kwargs: Dict[str, Any]) -> str:
    args = ", ".join("%s=%r" % kv for kv in sorted(kwargs.items()))
    return "%s:%s%s" % (kind, name, "(%s)" % args if args else "")


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state tensor's name, dtype, shape and bytes (weights and buffers)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(("%s|%s|%s|" % (key, tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def describe(built: BuiltModel) -> str:
    """One line for logs: builder, classes, weights, preprocessing."""
    params = sum(p.numel() for p in built.model.parameters())
    return "%s, %d classes%s, %.1fM parameters, weights %s; %s" % (
        built.builder, built.num_classes, " (%s, ...)" % ", ".join(built.class_names[:3])
        if built.class_names else "", params / 1e6, built.weights, built.preprocessing.describe())
