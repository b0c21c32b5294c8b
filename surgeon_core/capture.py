"""Route every tensor autograd saves through one storage policy, knowing which module saved it.

Usage::

    capture = ActivationCapture(model, CapturePolicy())
    with capture.record(keep_ratios={"layer1.0.conv1": 0.2}) as rec:
        loss = criterion(model(x))
    print(rec.cache_bytes())        # bytes really held for backward, now
    loss.backward()

Where each saved tensor ends up is decided by the op that saved it and the module running
(``roles.py`` has the full table and NOTE [Ops, not only modules]):

    ======================================  =========================  =====================
    saved tensor                            stored as                  bytes
    ======================================  =========================  =====================
    a parameter (or a view of one)          referenced                 0 (not cache)
    input of conv/linear, activation times  Pruned at the layer ratio  see NOTE [Pruned format]
      a parameter (weight grad only)
    x_hat of RunningStatNorm2d (gamma grad) Pruned at the layer ratio  same
    ReLU family, hardsigmoid's window       BitMask (lossless)         numel / 8
    input of average and max pooling        ShapeOnly (lossless)       0
    input of norms, GELU, SiLU, attention,  ``input_grad`` policy      exact, or 2 B (fp16)
      products of two activations, ...
    anything else                           Exact reference            its storage
    ======================================  =========================  =====================

NOTE [Cache bytes]
A graph lives while its outputs do (NOTE [No cycle through saved tensors]): read the record
while holding the loss or logits, as backward does.
The cache of a step is what the packed objects alive at the start of backward hold, each storage
counted once (two ops saving one tensor share it, as in plain autograd). Counting then, not at
the end of forward, includes every pass whose graph is still alive (a consistency loss's second
forward doubles it, a probe pass kept around shows up). The published SURGEON code instead
reports kept values x 4 bytes; that number is ``paper_bytes()`` and is only ever shown beside
this.

Nesting: ``saved_tensors_hooks`` are innermost-wins. A record refuses to open inside another
record of the same capture (its accounting would be split), and code that installs its own hooks
inside the forward (``torch.utils.checkpoint``, ``save_on_cpu``) takes those tensors out of ours.
"""

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from .errors import CaptureError
from .norm import RunningStatNorm2d
from .opcount import gpu_path
from .pool_indices import pack_pool_indices
from .roles import Decision, OpTracker, Role, classify_module, classify_op, storage_key
from .sparsity import (VALUE_DTYPES, SELECTIONS, BitMask, Cast, Exact, Packed, ShapeOnly,
                       prune)

__all__ = ["CapturePolicy", "ActivationCapture", "CaptureRecord", "LayerCache", "Role",
           "prunable_sizes", "paper_bytes"]

INPUT_GRAD_POLICIES = ("exact", "fp16", "bf16")

@dataclass(frozen=True)
class CapturePolicy:
    """How saved tensors are stored.

    Attributes:
        value_dtype: dtype of kept values of pruned tensors: ``fp16`` (default), ``fp32``, ``bf16``.
        selection: ``threshold`` (sampled quantile, fast) or ``topk`` (exact per-tensor top-k).
        input_grad: tensors the input gradient needs: ``exact`` (default) or lossy ``fp16`` or
            ``bf16``.
        relu_masks: store ReLU-family tensors as 1-bit masks (lossless).
        default_keep: keep ratio of prunable layers that have no ratio of their own.
        passthrough: store everything exactly (plain autograd), only count it.
        sync_free: pruned tensors in the fixed-capacity form that never waits on the device
            (NOTE [Sync-free packing]); ``None`` chooses it for CUDA tensors.
    """

    value_dtype: str = "fp16"
    selection: str = "threshold"
    input_grad: str = "exact"
    relu_masks: bool = True
    default_keep: float = 1.0
    passthrough: bool = False
    sync_free: Optional[bool] = None

    def __post_init__(self):
        _check_choice("value_dtype", self.value_dtype, tuple(VALUE_DTYPES))
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("input_grad", self.input_grad, INPUT_GRAD_POLICIES)
        check_keep_ratio("default_keep", self.default_keep)

    def sync_free_on(self, device: torch.device) -> bool:
        """Whether pruned tensors on ``device`` use the sync-free form (a CUDA device's, and
        an operator counter's: ``opcount.gpu_path``)."""
        if self.sync_free is not None:
            return self.sync_free
        return device.type == "cuda" or gpu_path()

    @classmethod
    def lossless(cls) -> "CapturePolicy":
        """Exact storage, compact only where that is free: gradients equal plain autograd's."""
        return cls(value_dtype="fp32", selection="topk", input_grad="exact")


def _check_choice(field: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError("CapturePolicy.%s must be one of %s, got %r" % (field, choices, value))


def check_keep_ratio(name: str, ratio: float) -> None:
    """Raise ValueError unless ``ratio`` is a number in [0, 1]."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError("keep ratio of %s must be in [0, 1], got %r" % (name, ratio))


class LayerCache(NamedTuple):
    """What one layer's saved tensors cost in the current step."""

    numel: int      # elements of the original tensors
    kept: int       # values kept (numel for exact storage)
    nbytes: int     # bytes held by its packed objects (not deduplicated across layers)
    role: str
    kind: str = "other"    # the layer kind (roles.py): conv, relu, norm, attention, ...


def prunable_sizes(layers: Mapping[str, LayerCache]) -> Dict[str, int]:
    """Elements saved per prunable layer (the activation size A_i), from ``record.layers()``."""
    return {name: c.numel for name, c in layers.items() if c.role == Role.WEIGHT_GRAD}


class _Entry(NamedTuple):
    packed: "weakref.ReferenceType[Packed]"
    layer: str
    role: str
    kind: str


class _Frame(NamedTuple):
    module: nn.Module
    name: str
    input_storages: Set[int]
    input_numel: int


_storage_key = storage_key


class CaptureRecord:
    """One step's saved tensors: opened by ``ActivationCapture.record``; read before backward."""

    def __init__(self, capture: "ActivationCapture", keep_ratios: Mapping[str, float],
                 passthrough: bool = False):
        for name, ratio in keep_ratios.items():
            check_keep_ratio(name, ratio)
        self.keep_ratios = dict(keep_ratios)
        self.passthrough = passthrough or capture.policy.passthrough
        self._capture = capture
        self._entries: List[_Entry] = []
        self._casts: Dict[tuple, list] = {}   # (device, storage, dtype) -> [(start, numel, copy)]
        self._param_storages = {_storage_key(p) for p in capture.model.parameters()}

    def _pack(self, tensor: torch.Tensor):
        if _storage_key(tensor) in self._param_storages:
            return tensor  # referenced: never copied, never counted
        decision = self._capture.classify(tensor)
        layer = self._capture.layer_key(decision)
        packed = self._store(tensor, decision, layer)
        self._entries.append(_Entry(weakref.ref(packed), layer, decision.role, decision.kind))
        return packed

    def _store(self, tensor: torch.Tensor, decision: Decision, layer: str) -> Packed:
        policy, role = self._capture.policy, decision.role
        if decision.pool is not None and not self.passthrough:
            return pack_pool_indices(tensor, decision.pool)
        if self.passthrough or not tensor.is_floating_point():
            return Exact(tensor)
        if role == Role.WEIGHT_GRAD:
            keep = self.keep_ratios.get(layer, policy.default_keep)
            if decision.weight is None or not decision.weight.requires_grad:
                keep = 0.0  # a frozen weight needs no cached input (conv saves it regardless)
            return prune(tensor, keep, policy.selection, VALUE_DTYPES[policy.value_dtype],
                         sync_free=policy.sync_free_on(tensor.device))
        if role == Role.MASK and policy.relu_masks:
            return BitMask(tensor, *decision.bounds)
        if role == Role.SHAPE:
            return ShapeOnly(tensor)
        if role == Role.INPUT_GRAD and policy.input_grad != "exact" and decision.castable:
            return self._cast(tensor, VALUE_DTYPES[policy.input_grad])
        return Exact(tensor)

    def _cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> Packed:
        """One low-precision copy per stretch of storage: ops saving views of one tensor (q, k
        and v of one projection; softmax's output and the product that reads it) share the
        copy, as they share the original in plain autograd. A copy is reused only while the
        tensor it was made from lives (a freed tensor's address may hold another one) and no
        in-place op has written to it since (its version counter)."""
        key = (tensor.device, _storage_key(tensor), dtype)
        offset, extent = tensor.storage_offset(), _extent(tensor)
        version = tensor._version   # shared by every view; an in-place write moves it on
        for start, numel, copy_ref, source_ref, made_at in self._casts.get(key, []):
            flat, source = copy_ref(), source_ref()
            if flat is not None and source is not None and made_at == version \
                    and start <= offset and offset + extent <= start + numel:
                view = flat.as_strided(tensor.shape, tensor.stride(),
                                       flat.storage_offset() + offset - start)
                return Cast(tensor, dtype, view)
        if extent != tensor.numel():   # overlapping or gappy: copy just this view
            return Cast(tensor, dtype)
        flat = tensor.detach().as_strided((extent,), (1,), offset).to(dtype)
        entries = [e for e in self._casts.get(key, []) if e[3]() is not None]
        base = tensor._base if tensor._base is not None else tensor   # lives while any view does
        self._casts[key] = entries + [(offset, extent, weakref.ref(flat), weakref.ref(base),
                                       version)]
        return Cast(tensor, dtype, flat.as_strided(tensor.shape, tensor.stride(),
                                                    flat.storage_offset()))

    @staticmethod
    def _unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()

    def _alive(self) -> Iterator[Tuple[Packed, _Entry]]:
        for entry in self._entries:
            packed = entry.packed()
            if packed is not None:
                yield packed, entry

    def cache_bytes(self) -> int:
        """Bytes held now by every saved tensor of this record, each storage once.

        See NOTE [Cache bytes].
        """
        seen: Dict[Tuple[str, int], int] = {}
        for packed, _ in self._alive():
            for t in packed.tensors():
                storage = t.untyped_storage()
                seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return sum(seen.values())

    def layers(self) -> Dict[str, LayerCache]:
        """Per-layer totals over alive saved tensors (a layer called twice sums both calls).

        A layer's activation is keyed by its module name; its other saved tensors (statistics
        such as a norm's ``invstd``) are keyed ``"<name>:other"``, so the activation's numel and
        bytes are exactly the activation's. Kept counts living on a device are read in one go.
        """
        alive = list(self._alive())
        kept = _read_counts([packed.kept_lazy() for packed, _ in alive])
        out: Dict[str, LayerCache] = {}
        for (packed, entry), n_kept in zip(alive, kept):
            key = entry.layer if entry.role != Role.OTHER else entry.layer + ":other"
            prev = out.get(key, LayerCache(0, 0, 0, entry.role, entry.kind))
            out[key] = LayerCache(prev.numel + packed.numel, prev.kept + n_kept,
                                  prev.nbytes + packed.nbytes, prev.role, prev.kind)
        return out

    def bytes_by_kind(self) -> Dict[Tuple[str, str], int]:
        """Bytes held now per (kind, role), each storage counted once (under its first kind)."""
        seen: Dict[Tuple[str, int], Tuple[str, str]] = {}
        sizes: Dict[Tuple[str, int], int] = {}
        for packed, entry in self._alive():
            for t in packed.tensors():
                key = (str(t.device), t.untyped_storage().data_ptr())
                seen.setdefault(key, (entry.kind, entry.role))
                sizes[key] = t.untyped_storage().nbytes()
        out: Dict[Tuple[str, str], int] = {}
        for key, group in seen.items():
            out[group] = out.get(group, 0) + sizes[key]
        return out


def _extent(t: torch.Tensor) -> int:
    """Elements of storage between a view's first and last element (numel when dense)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def paper_bytes(layers: Mapping[str, LayerCache]) -> int:
    """The published code's convention: kept values of layer inputs x 4 bytes (see NOTE)."""
    layer_roles = (Role.WEIGHT_GRAD, Role.INPUT_GRAD)
    return 4 * sum(c.kept for c in layers.values() if c.role in layer_roles)


def _read_counts(counts) -> List[int]:
    on_device = [c for c in counts if isinstance(c, torch.Tensor)]
    if not on_device:
        return [int(c) for c in counts]
    values = iter(torch.stack([c.to(on_device[0].device) for c in on_device]).tolist())
    return [int(next(values)) if isinstance(c, torch.Tensor) else int(c) for c in counts]


def _param_keys(model: nn.Module) -> Dict[int, str]:
    """id(parameter) -> its layer key: the module's name for a module's ``weight``, else the
    parameter's dotted name."""
    keys = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in keys:
                continue   # tied weights keep their first owner
            keys[id(param)] = module_name if param_name == "weight" else \
                ("%s.%s" % (module_name, param_name) if module_name else param_name)
    return keys


class ActivationCapture:
    """Installs module hooks on ``model`` once; ``record()`` routes one step's saved tensors.

    Args:
        model: any ``nn.Module``; activations must be modules (``nn.ReLU``) to be compacted,
            functional calls inside a container are stored exactly (correct, just not compact).
        policy: storage choices, see ``CapturePolicy``.
    """

    def __init__(self, model: nn.Module, policy: Optional[CapturePolicy] = None):
        self.model = model
        self.policy = policy or CapturePolicy()
        self._names = {id(m): n for n, m in reversed(list(model.named_modules()))}
        self._params = {_storage_key(p): p for p in model.parameters()}
        self._param_keys = _param_keys(model)
        by_id = {id(p): p for p in model.parameters()}
        self._weights_by_key = {key: by_id[pid] for pid, key in self._param_keys.items()}
        self._stack: List[_Frame] = []
        self._recording = False
        self._tracker: Optional[OpTracker] = None
        self._handles = []
        for module in model.modules():
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))

    def close(self) -> None:
        """Remove the module hooks; the model behaves as if never captured."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module: nn.Module, args) -> None:
        if self._recording:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            storages = {_storage_key(t) for t in tensors}
            numel = max((t.numel() for t in tensors), default=0)
            self._stack.append(_Frame(module, self._names.get(id(module), ""), storages, numel))

    def _exit(self, module: nn.Module, args, output) -> None:
        if not self._recording:
            return
        while self._stack:  # an exception earlier may have skipped inner exits
            if self._stack.pop().module is module:
                break

    def current_frame(self) -> Optional[_Frame]:
        return self._stack[-1] if self._stack else None

    def classify(self, tensor: torch.Tensor) -> Decision:
        """Why ``tensor`` is being saved now: our own norm's rule, else the op's, else the
        innermost running module's (see roles.py)."""
        frame = self.current_frame()
        if frame is not None and isinstance(frame.module, RunningStatNorm2d):
            if tensor.dim() > 1:
                return Decision(Role.WEIGHT_GRAD, "norm_xhat", weight=frame.module.weight)
            return Decision(Role.OTHER, "norm_xhat")
        call = self._tracker.current if self._tracker is not None else None
        if call is not None:
            decision = classify_op(call, tensor, self._params)
            if decision is not None:
                return decision
        if not tensor.is_floating_point():   # indices and masks of ops no rule knows
            return Decision(Role.OTHER, "index")
        if frame is None:
            return Decision(Role.OTHER, "other")
        return classify_module(frame.module, frame.input_storages, frame.input_numel, tensor)

    def layer_key(self, decision: Decision) -> str:
        """A weight_grad tensor's layer: the module whose ``weight`` it serves (its name), or
        the parameter's own name (``blocks.0.layer_scale``); else the running module's name."""
        if decision.weight is not None:
            return self._param_keys.get(id(decision.weight), "")
        frame = self.current_frame()
        return frame.name if frame else ""

    def weight_of(self, layer: str) -> Optional[torch.Tensor]:
        """The parameter a layer key stands for (see ``layer_key``)."""
        return self._weights_by_key.get(layer)

    @contextlib.contextmanager
    def record(self, keep_ratios: Optional[Mapping[str, float]] = None,
               passthrough: bool = False) -> Iterator[CaptureRecord]:
        """Capture the tensors saved inside the block; the record stays readable afterwards.

        ``passthrough`` stores everything exactly (plain autograd) and only counts it.

        Raises:
            CaptureError: a record of this capture is already open (nesting would split accounting).
            ValueError: a keep ratio outside [0, 1].
        """
        if self._recording:
            raise CaptureError("a record of this capture is already open; close it before opening "
                               "another (nested records would split the cache accounting)")
        rec = CaptureRecord(self, keep_ratios or {}, passthrough)
        self._recording, self._stack = True, []
        self._tracker = OpTracker()
        try:
            with torch.autograd.graph.saved_tensors_hooks(rec._pack, rec._unpack), self._tracker:
                yield rec
        finally:
            self._recording, self._stack, self._tracker = False, [], None
