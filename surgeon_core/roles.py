"""Why autograd saved a tensor: the op that saved it, the argument it was, the module running.

The capture layer asks ``classify`` for every saved tensor. The answer (a ``Decision``) names a
storage ``role`` and a layer ``kind``:

    ==============================================  ==========  ===============================
    saved tensor                                    role        kind
    ==============================================  ==========  ===============================
    input of conv/linear/addmm (weight a parameter)  weight_grad conv, linear
    activation times a parameter (layer scale)      weight_grad scale
    input or output of ReLU, leaky ReLU, ReLU6,     mask        relu, hardtanh, hardsigmoid
      hardtanh; input of hardsigmoid (-3 < x < 3)
    input of average / adaptive average pooling,    shape       avgpool, maxpool
      input of max pooling (backward uses indices)
    input of norms (batch, layer, group, instance)  input_grad  norm
    input of GELU, SiLU, hardswish, ELU, Mish,      input_grad  gelu, silu, hardswish, activation
      softplus; output of sigmoid, tanh, softmax                sigmoid, tanh, softmax
    q, k, v and output of attention; inputs of a    input_grad  attention, matmul
      product of two activations (q @ k^T, attn @ v)
    both inputs of an activation x activation       input_grad  product
      product (squeeze-excitation, gating)
    dropout masks, pooling indices, statistics      other       dropout, maxpool, norm, ...
    anything else                                   other       other (stored exactly)
    ==============================================  ==========  ===============================

NOTE [Ops, not only modules]
A module tells which layer runs, not which op saved a tensor: torchvision's squeeze-excitation
multiplies inside its own forward, Swin and multi-head attention call ``F.linear`` on their own
parameters, ConvNeXt multiplies by a layer-scale parameter, users write ``F.relu``. So while a
record is open a ``TorchFunctionMode`` notes the outermost torch function being called, and the
saved tensor is matched by storage against that call's arguments. ``multi_head_attention_forward``
is one overridable Python function around several ops; it is run through a copy whose override
check is off, with the mode pushed again, so its ``linear`` and ``scaled_dot_product_attention``
calls are seen one by one. Where no op is known (a custom autograd Function, a scripted module)
the module rules apply, and what no rule knows is stored exactly: never wrong, only not compact.
"""

import math
import types
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .frozen_conv import frozen_weight_call
from .pool_indices import pool_geometry

__all__ = ["Role", "Decision", "OpTracker", "classify_op", "classify_module", "storage_key"]


class Role:
    """Why a tensor was saved; decides its storage."""

    PARAM = "param"
    WEIGHT_GRAD = "weight_grad"    # only a weight gradient reads it: prunable
    MASK = "mask"                  # ReLU-like: a 1-bit mask is lossless
    SHAPE = "shape"                # backward reads only its shape
    INPUT_GRAD = "input_grad"      # the input gradient reads it: exact or a named lossy cast
    OTHER = "other"                # unknown or small: exact


class Decision(NamedTuple):
    role: str
    kind: str
    weight: Optional[torch.Tensor] = None       # the parameter a weight_grad tensor serves
    bounds: Tuple[float, float] = (0.0, math.inf)   # mask: the interval where the bit is set
    pool: Optional[tuple] = None                # max pooling's geometry (its indices pack)
    castable: bool = True                       # may a lossy input_grad policy cast it


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Call(NamedTuple):
    name: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


# -- the tracker -----------------------------------------------------------------------------

_OVERRIDE_CHECKS = ("has_torch_function", "has_torch_function_unary",
                    "has_torch_function_variadic")


def _without_override_check(fn: Callable) -> Callable:
    """A copy of a torch Python function whose ``has_torch_function`` checks say no."""
    env = dict(fn.__globals__)
    for name in _OVERRIDE_CHECKS:
        env[name] = lambda *args, **kwargs: False
    copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_DESCEND = {F.multi_head_attention_forward: _without_override_check(
    F.multi_head_attention_forward)}


class OpTracker(TorchFunctionMode):
    """Remembers the outermost torch function running now (see NOTE [Ops, not only modules])."""

    def __init__(self):
        super().__init__()
        self.current: Optional[Call] = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        inner = _DESCEND.get(func)
        if inner is not None:
            with self:
                return inner(*args, **kwargs)
        frozen = frozen_weight_call(func, args, kwargs)   # NOTE [Frozen-weight convolutions]
        previous = self.current
        self.current = Call(getattr(func, "__name__", ""), args, kwargs)
        try:
            return frozen() if frozen is not None else func(*args, **kwargs)
        finally:
            self.current = previous


# -- rules by op -----------------------------------------------------------------------------

# name -> (index of the input, index of the weight)
_WEIGHT_OPS = {name: (0, 1) for name in (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d")}
_WEIGHT_OPS.update(addmm=(1, 2))
_KIND_OF_WEIGHT_OP = {"linear": "linear", "addmm": "linear"}
_PRODUCTS = {"mul": "product", "mul_": "product", "__mul__": "product", "__rmul__": "product",
             "__imul__": "product", "matmul": "matmul", "__matmul__": "matmul",
             "__rmatmul__": "matmul", "mm": "matmul", "bmm": "matmul"}
_MASKS = {"relu": (0.0, math.inf), "relu_": (0.0, math.inf), "leaky_relu": (0.0, math.inf),
          "leaky_relu_": (0.0, math.inf), "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0)}
_HARDTANH = ("hardtanh", "hardtanh_")
_SHAPES = {"avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
           "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool",
           "adaptive_avg_pool3d": "avgpool", "max_pool1d": "maxpool", "max_pool2d": "maxpool",
           "max_pool3d": "maxpool"}
_INPUT_GRAD = {"layer_norm": "norm", "group_norm": "norm", "batch_norm": "norm",
               "instance_norm": "norm", "gelu": "gelu", "silu": "silu", "hardswish": "hardswish",
               "elu": "activation", "selu": "activation", "celu": "activation",
               "mish": "activation", "softplus": "activation", "sigmoid": "sigmoid",
               "tanh": "tanh", "softmax": "softmax", "log_softmax": "softmax",
               "scaled_dot_product_attention": "attention", "einsum": "matmul",
               "hardswish_": "hardswish", "silu_": "silu", "sigmoid_": "sigmoid",
               "tanh_": "tanh", "hardsigmoid_": "hardsigmoid"}
_INDEXING = ("__getitem__", "index_select", "gather", "embedding", "take_along_dim")
_DROPOUT = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
            "feature_alpha_dropout")


def _tensors(args: Sequence[Any]):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (a for a in arg if isinstance(a, torch.Tensor))


def _same(t: torch.Tensor, arg: Any) -> bool:
    return isinstance(arg, torch.Tensor) and storage_key(arg) == storage_key(t)


def classify_op(call: Call, tensor: torch.Tensor,
                params: Dict[int, torch.Tensor]) -> Optional[Decision]:
    """The decision for ``tensor`` saved inside ``call``, or None when no op rule applies.

    ``params`` maps the storage of every parameter of the captured model to the parameter.
    """
    name, args = call.name, call.args
    if name in _WEIGHT_OPS:
        return _weight_op(name, args, call.kwargs, tensor, params)
    if name in _PRODUCTS:
        return _product(_PRODUCTS[name], args, tensor, params)
    if name in _MASKS and _mask_is_exact(name, args, call.kwargs):
        return Decision(Role.MASK, "hardsigmoid" if name == "hardsigmoid" else "relu",
                        bounds=_MASKS[name])
    if name in _HARDTANH:
        low = _arg(args, call.kwargs, 1, "min_val", -1.0)
        high = _arg(args, call.kwargs, 2, "max_val", 1.0)
        return Decision(Role.MASK, "hardtanh", bounds=(float(low), float(high)))
    if name in _SHAPES:
        if args and _same(tensor, args[0]):
            return Decision(Role.SHAPE, _SHAPES[name])
        geometry = pool_geometry(args, call.kwargs) if name == "max_pool2d" else None
        return Decision(Role.OTHER, _SHAPES[name], pool=geometry)
    if name in _MASKS:
        return Decision(Role.INPUT_GRAD, "hardsigmoid" if name == "hardsigmoid" else "relu")
    if name in _INPUT_GRAD:
        kind = _INPUT_GRAD[name]
        # norms and attention also save per-row statistics (mean, rstd, log-sum-exp): small,
        # and kept exact; every operand of a product is an activation
        largest = max((t.numel() for t in _tensors(args)), default=0)
        statistic = kind in ("norm", "attention") and tensor.numel() * 8 <= largest
        # batch statistics over few values are ill-conditioned: a rounded input against the
        # exact saved invstd blows the gradient up, so train-mode BatchNorm stays exact
        return Decision(Role.OTHER if statistic else Role.INPUT_GRAD, kind,
                        castable=name != "batch_norm")
    if name in _DROPOUT:
        return Decision(Role.OTHER, "dropout")
    if name in _INDEXING:
        return Decision(Role.OTHER, "index")
    return None


def _mask_is_exact(name: str, args, kwargs) -> bool:
    """In-place hardsigmoid keeps only its output, and a leaky ReLU with a negative slope
    flips signs: neither answers "was the input inside" from a saved tensor."""
    if name == "hardsigmoid":
        return not _arg(args, kwargs, 1, "inplace", False)
    if name.startswith("leaky_relu"):
        return float(_arg(args, kwargs, 1, "negative_slope", 0.01)) >= 0
    return True


def _arg(args, kwargs, index: int, key: str, default):
    if key in kwargs:
        return kwargs[key]
    return args[index] if len(args) > index else default


def _weight_op(name, args, kwargs, tensor, params) -> Decision:
    kind = _KIND_OF_WEIGHT_OP.get(name, "conv")
    i_input, i_weight = _WEIGHT_OPS[name]
    weight = _arg(args, kwargs, i_weight, "weight", None)
    source = _arg(args, kwargs, i_input, "input", None)
    param = params.get(storage_key(weight)) if isinstance(weight, torch.Tensor) else None
    if param is None:   # a computed weight: its gradient reaches parameters through this input
        return Decision(Role.INPUT_GRAD if _same(tensor, source) else Role.OTHER, kind)
    # with a parameter weight, what else the op saves is its input, or the flattened copy of a
    # non-contiguous input (a transposed view into F.linear) that matmul makes
    if _same(tensor, source) or (isinstance(source, torch.Tensor)
                                 and tensor.numel() == source.numel()):
        return Decision(Role.WEIGHT_GRAD, kind, weight=param)
    return Decision(Role.OTHER, kind)


def _product(kind: str, args, tensor, params) -> Decision:
    operands = [a for a in args if isinstance(a, torch.Tensor)]
    if len(operands) == 2:
        first, second = operands
        for mine, other in ((first, second), (second, first)):
            param = params.get(storage_key(other))
            if _same(tensor, mine) and param is not None and not _same(tensor, other):
                return Decision(Role.WEIGHT_GRAD, "scale" if kind == "product" else "linear",
                                weight=param)
    return Decision(Role.INPUT_GRAD, kind)


# -- rules by module (no op known) -----------------------------------------------------------

_PRUNABLE_INPUT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.modules.instancenorm._InstanceNorm)
_INPUT_GRAD_MODULES = _NORMS + (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Mish,
                                nn.ELU, nn.Softmax)
_SHAPE_ONLY = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
               nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def classify_module(module: nn.Module, input_storages, input_numel: int,
                    tensor: torch.Tensor) -> Decision:
    """The module rules: for saves no op rule knows (custom Functions, scripted code)."""
    if isinstance(module, _PRUNABLE_INPUT):
        if storage_key(tensor) in input_storages and module.weight is not None:
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            return Decision(Role.WEIGHT_GRAD, kind, weight=module.weight)
        return Decision(Role.OTHER, "other")
    if isinstance(module, nn.Hardtanh):   # ReLU6 is a Hardtanh
        return Decision(Role.MASK, "hardtanh", bounds=(module.min_val, module.max_val))
    if isinstance(module, nn.ReLU):
        return Decision(Role.MASK, "relu")
    if isinstance(module, _SHAPE_ONLY):
        role = Role.SHAPE if storage_key(tensor) in input_storages else Role.OTHER
        return Decision(role, "avgpool")
    if isinstance(module, _INPUT_GRAD_MODULES):
        # statistics (mean, invstd) are small and stay exact; the activation follows policy
        role = Role.INPUT_GRAD if tensor.numel() == input_numel else Role.OTHER
        kind = "norm" if isinstance(module, _NORMS) else type(module).__name__.lower()
        batch = isinstance(module, nn.modules.batchnorm._BatchNorm)
        return Decision(role, kind, castable=not batch)
    return Decision(Role.OTHER, "other")
