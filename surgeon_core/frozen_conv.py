"""Convolutions whose weight is frozen: the input gradient without the input.

NOTE [Frozen-weight convolutions]
Autograd's convolution saves its input even when only the input gradient is wanted, and ATen's
``convolution_backward`` makes that input contiguous before it reads no more than its shape. The
capture stores such an input as nothing (a broadcast zero: no weight gradient reads it), so every
frozen convolution's backward built a full-size zero tensor: 12.5 MiB at each first-stage conv of
ResNet-20 at batch 200, and, in an allocator's accounting, the backward's peak (issue 15). While a
capture records, the op tracker sends a convolution whose weight (and bias) is frozen and whose
input needs a gradient here: it saves only the weight, and its input gradient is the transposed
convolution of the output gradient, with the output padding that restores the input's size. The
operator count is unchanged (one convolution instead of one convolution backward).
Convolutions with string padding ("same"), under autocast or on unbatched input keep autograd's
own path.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = ["frozen_weight_call"]

_TRANSPOSED = {F.conv1d: F.conv_transpose1d, F.conv2d: F.conv_transpose2d,
               F.conv3d: F.conv_transpose3d}
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def frozen_weight_call(func: Callable, args: Sequence[Any],
                       kwargs: Dict[str, Any]) -> Optional[Callable[[], torch.Tensor]]:
    """A call running ``func(*args, **kwargs)`` through ``_FrozenWeightConv``, or None where
    autograd's own path is the one to take."""
    transposed = _TRANSPOSED.get(func)
    if transposed is None or not torch.is_grad_enabled() or _autocast_enabled():
        return None
    bound = _bind(args, kwargs)
    if bound is None:
        return None
    x, weight, bias = bound["input"], bound["weight"], bound["bias"]
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not (frozen and x.requires_grad and x.dim() == weight.dim()
            and not isinstance(bound["padding"], str)):
        return None
    spatial = weight.dim() - 2
    geometry = tuple(_expand(bound[name], spatial) for name in ("stride", "padding", "dilation"))
    return lambda: _FrozenWeightConv.apply(x, weight, bias, func, transposed, geometry,
                                           bound["groups"])


def _bind(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if len(args) > len(_ARGUMENTS) or any(k not in _ARGUMENTS for k in kwargs):
        return None
    bound = dict(_DEFAULTS)
    bound.update(zip(_ARGUMENTS, args))
    bound.update(kwargs)
    tensors = (bound.get("input"), bound.get("weight"))
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return bound


def _expand(value, spatial: int) -> Tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values * spatial if len(values) == 1 else values


def _autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
    except TypeError:   # torch before 2.4 takes no device
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class _FrozenWeightConv(torch.autograd.Function):
    """``func`` forward; backward: the input gradient by ``transposed``, nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias, func, transposed, geometry, groups):
        stride, padding, dilation = geometry
        out = func(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.call = (transposed, geometry, groups, tuple(x.shape[2:]), tuple(out.shape[2:]))
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        transposed, (stride, padding, dilation), groups, size, out_size = ctx.call
        kernel = weight.shape[2:]
        # the sizes a stride drops: what the transposed convolution must add back
        extra = tuple(n - ((m - 1) * s - 2 * p + d * (k - 1) + 1) for n, m, s, p, d, k in
                      zip(size, out_size, stride, padding, dilation, kernel))
        grad_x = transposed(grad, weight, None, stride, padding, extra, groups, dilation)
        return grad_x, None, None, None, None, None, None
