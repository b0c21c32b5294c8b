"""From a frame to the model's input: the geometry (resize, crop, letterbox, squash) and the
per-channel normalisation a model was trained with.

The geometry runs outside the model, on [0, 1] RGB tensors, so the daemon's ring buffer can keep
the model-sized frame as uint8. The normalisation runs inside the model (``attach_normalization``),
so every caller, the learner's augmentations included, feeds the model the same [0, 1] images.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Preprocessing", "MODES", "INPUT_NORM", "attach_normalization", "input_normalization"]

MODES = ("crop", "letterbox", "squash")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
INPUT_NORM = "input_normalize"      # the submodule attach_normalization adds


@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes a ``crop`` x ``crop`` input.

    Attributes:
        crop: the model's square input size.
        mode: ``crop`` (shorter side to ``resize``, then the centre ``crop``; torchvision's
            evaluation transform), ``letterbox`` (the whole frame fitted in, padded with
            ``pad_value``) or ``squash`` (resized to the square, aspect ratio ignored).
        resize: shorter side before the centre crop (``crop`` mode only).
        mean, std: per-channel normalisation of [0, 1] RGB; ``None`` leaves the input as it is.
        interpolation: ``bilinear`` (antialiased when shrinking), ``bicubic`` or ``nearest``.
    """

    crop: int
    mode: str = "crop"
    resize: Optional[int] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    interpolation: str = "bilinear"
    pad_value: float = 0.5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError("preprocessing mode must be one of %s, got %r" % (MODES, self.mode))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError("interpolation must be one of %s, got %r"
                             % (INTERPOLATIONS, self.interpolation))
        if self.crop < 8:
            raise ValueError("crop (the model's input size) must be >= 8, got %r" % (self.crop,))
        if self.mode == "crop" and self.resize is not None and self.resize < self.crop:
            raise ValueError("resize (%d) must be >= crop (%d)" % (self.resize, self.crop))
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        values = tuple(self.mean or ()) + tuple(self.std or ())
        if not all(math.isfinite(v) for v in values) or (self.std and min(self.std) <= 0):
            raise ValueError("mean must be finite and std finite and > 0, got mean %s std %s"
                             % (self.mean, self.std))

    def describe(self) -> str:
        geometry = {"crop": "shorter side %s, centre crop %d" % (self.resize, self.crop),
                    "letterbox": "letterbox into %d x %d" % (self.crop, self.crop),
                    "squash": "squash to %d x %d" % (self.crop, self.crop)}[self.mode]
        norm = "no normalisation" if self.mean is None else "mean %s std %s" % (
            _short(self.mean), _short(self.std))
        return "%s, %s, %s" % (geometry, self.interpolation, norm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float NCHW of any size -> [0, 1] float N x 3 x crop x crop."""
        h, w = x.shape[-2:]
        if (h, w) == (self.crop, self.crop):
            return x
        if self.mode == "squash":
            return self._resize(x, (self.crop, self.crop))
        if self.mode == "letterbox":
            return self._letterbox(x)
        short = self.resize or self.crop
        scale = short / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = self._resize(x, size) if size != (h, w) else x
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        return x[..., top:top + self.crop, left:left + self.crop]

    def _letterbox(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.crop / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        inner = self._resize(x, size)
        out = x.new_full(x.shape[:-2] + (self.crop, self.crop), self.pad_value)
        top, left = (self.crop - size[0]) // 2, (self.crop - size[1]) // 2
        out[..., top:top + size[0], left:left + size[1]] = inner
        return out

    def _resize(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        out = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                            antialias=shrinking)
        return out.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else out


def _short(values: Sequence[float]) -> str:
    return "[%s]" % ", ".join("%.3g" % v for v in values)


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel; buffers stay out of the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _normalize_first_input(module: nn.Module, args):
    # a module-level function (not a closure) so that deepcopy and pickling keep the model whole
    return (getattr(module, INPUT_NORM)(args[0]),) + tuple(args[1:])


def attach_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make ``model`` normalise its own input: a submodule plus a forward pre-hook.

    The model's state dict keys stay the user's (the buffers are not persistent), copies keep
    the hook, and ``.to(device)`` moves the statistics with the weights.
    """
    if hasattr(model, INPUT_NORM):
        raise ValueError("model already has an attribute %r" % INPUT_NORM)
    model.add_module(INPUT_NORM, InputNormalize(mean, std))
    model.register_forward_pre_hook(_normalize_first_input)


def input_normalization(model: nn.Module) -> Optional[nn.Module]:
    """The normaliser ``attach_normalization`` added, for code that calls a model's parts."""
    return getattr(model, INPUT_NORM, None)
