"""Compact storage for tensors that autograd saves: pruned activations, 1-bit masks, casts.

Every packed object answers three questions: ``unpack()`` (the tensor backward will see),
``tensors()`` (what it really holds, for byte accounting) and ``kept``/``numel`` (how much of the
original survived). See NOTE [Cache bytes] in capture.py for how those bytes are counted.

NOTE [Pruned format]
A pruned tensor keeps the k largest-magnitude values. Two encodings, the smaller one wins:
  * bitmask + values: numel/8 bytes of mask plus k values (fp16 by default, 2 B each);
  * int32 indices + values: 4 B per kept element plus its value.
The bitmask wins above a keep ratio of 1/32, the indices below it; at keep 0 nothing is held.
Zeros are never stored as values (the mask says "zero" for free), so a post-ReLU tensor that is
half zeros costs half as much at keep 1. fp16 values fall back to the tensor's own dtype when a
kept value would overflow fp16, so packing never turns finite activations into inf.
"""

import functools
import math
import sys
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["Packed", "Exact", "Cast", "Dropped", "ShapeOnly", "BitMask", "Pruned", "PrunedFixed",
           "capacity_for", "sampling_margin", "quantile_sample", "memory_order", "flat_in_memory",
           "shaped_from_memory",
           "pack_bits", "unpack_bits", "select_topk", "select_threshold", "prune",
           "VALUE_DTYPES", "SELECTIONS"]

VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
SELECTIONS = ("threshold", "topk")
_FP16_MAX = 65504.0
# The threshold's sample (NOTE [Sample size]): 32,768 where it sets a fixed-capacity buffer's
# margin (the sync-free form), 8,192 where the kept values are counted exactly (the CPU's form)
QUANTILE_SAMPLE = 1 << 15
EXACT_COUNT_SAMPLE = 1 << 13


class Packed:
    """Base of every packed form; holds its tensors, restores the original on ``unpack``."""

    __slots__ = ("shape", "dtype", "numel", "_kept", "order", "__weakref__")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, kept: int,
                 order: Optional[Tuple[int, ...]] = None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.numel = math.prod(self.shape) if self.shape else 1
        self._kept = int(kept)
        self.order = order   # the dims' order in memory (NOTE [Memory order])

    def _shaped(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat``, in memory order, as a tensor of ``shape`` laid out as the original was."""
        return shaped_from_memory(flat, self.shape, self.order)

    @property
    def kept(self) -> int:
        """Values that survived packing (``numel`` for lossless forms)."""
        return self._kept

    def kept_lazy(self):
        """``kept`` as an int, or as a 0-dim device tensor where reading it would sync."""
        return self._kept

    def tensors(self) -> List[torch.Tensor]:
        return []

    def unpack(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of this object's own tensors (not deduplicated against others)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())


def memory_order(tensor: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """The permutation of ``tensor``'s dims that its memory runs in (outermost first), or None
    where that is their own order, or where its strides have none (overlapping, gappy).

    NOTE [Memory order]
    Packing flattens a tensor in the order its elements lie in memory, and unpacking restores
    that layout. A user's model in channels-last (``model.to(memory_format=torch.
    channels_last)``, the usual recipe for a GPU's tensor cores, and on the CPU the layout
    oneDNN's convolutions run without reordering) saves channels-last activations; flattened
    in the dims' order, each was first copied whole (ResNet-20: 65 full-size copies a step,
    977 operators against 909 for the same model in NCHW), and backward got NCHW tensors back
    beside channels-last gradients. Now the count is NCHW's. Any order is correct; the layout
    only decides whether flattening copies.
    """
    if tensor.dim() < 2 or tensor.is_contiguous():
        return None
    order = tuple(sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim)))
    return order if tensor.permute(order).is_contiguous() else None


def flat_in_memory(tensor: torch.Tensor, order: Optional[Tuple[int, ...]]) -> torch.Tensor:
    """``tensor``'s elements in ``order`` (``memory_order``) as one flat tensor: a view where
    the tensor is laid out so."""
    return (tensor.permute(order) if order is not None else tensor).reshape(-1)


def _flattened(tensor: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, ...]]]:
    """(``tensor`` detached and flat in memory order, that order): how every pruned form, and
    the mask it is given, read a tensor."""
    order = memory_order(tensor)
    return flat_in_memory(tensor.detach(), order), order


def shaped_from_memory(flat: torch.Tensor, shape: Sequence[int],
                       order: Optional[Tuple[int, ...]]) -> torch.Tensor:
    """The inverse of ``flat_in_memory``: a view of ``flat`` with ``shape``."""
    if order is None:
        return flat.view(shape)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.view([shape[dim] for dim in order]).permute(inverse)


class Exact(Packed):
    """The tensor's storage, referenced and never copied: plain autograd's behaviour.

    NOTE [No cycle through saved tensors]
    A saved output holds its ``grad_fn``, whose saved variables hold what the pack hook
    returned; keeping the tensor itself there closes a cycle through C++ that Python's collector
    cannot see, so a graph whose backward never runs (a meter's forward, a step that selected no
    sample or whose loss was not finite) would never be freed. A detached view shares the
    storage without the ``grad_fn``, which breaks the cycle; backward reads the same values.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.shape, tensor.dtype, tensor.numel())
        self.tensor = tensor.detach()

    def tensors(self) -> List[torch.Tensor]:
        return [self.tensor]

    def unpack(self) -> torch.Tensor:
        return self.tensor


class Cast(Packed):
    """A lossy low-precision copy (fp16/bf16); restored to the original dtype."""

    __slots__ = ("low",)

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype,
                 low: Optional[torch.Tensor] = None):
        super().__init__(tensor.shape, tensor.dtype, tensor.numel())
        # ``low``: a view, shaped like ``tensor``, of a copy already made of its elements
        self.low = low if low is not None else tensor.detach().to(dtype)

    def tensors(self) -> List[torch.Tensor]:
        return [self.low]

    def unpack(self) -> torch.Tensor:
        return self.low.to(self.dtype)


class Dropped(Packed):
    """Keep ratio 0: nothing held; backward sees zeros (a zero weight gradient)."""

    __slots__ = ("device",)

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.shape, tensor.dtype, 0)
        self.device = tensor.device

    def unpack(self) -> torch.Tensor:
        # one zero broadcast to the shape: no memory until a kernel asks for a contiguous copy
        return _zero(self.dtype, self.device).expand(self.shape)


@functools.lru_cache(maxsize=16)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared 0-dim zero: expanded views of it cannot be written in place."""
    return torch.zeros((), dtype=dtype, device=device)


class ShapeOnly(Dropped):
    """For ops whose backward reads only the shape (average pooling): lossless, zero bytes."""

    __slots__ = ()

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor)
        self._kept = self.numel


# Gathers the low bit of each of 8 bytes into the top byte of their int64 (byte i -> bit i):
# eight 0/1 bytes become one mask byte in two vector passes. Checked at import (_self_check).
_GATHER_BITS = 0x0102040810204080
_TOP_BYTE = 7 if sys.byteorder == "little" else 0


@functools.lru_cache(maxsize=16)
def _bit_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(256, 8) table: row v holds the 8 bits of v, lowest first (a constant, built once)."""
    shifts = torch.arange(8, device=device)
    return ((torch.arange(256, device=device).unsqueeze(1) >> shifts) & 1).to(dtype)


def pack_bits(mask: torch.Tensor, consume: bool = False,
              order: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element i -> bit i % 8), its elements
    taken in ``order`` (NOTE [Memory order]).

    ``consume``: ``mask`` is the caller's own temporary, and the products are formed in its
    memory (no second mask-sized buffer at the step's peak); its values are lost.
    """
    flat = flat_in_memory(mask, order)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    # the gathered bits are each product's top byte; copied out, they are the packed mask
    # (little-endian: byte 7; checked at import)
    products = words.mul_(_GATHER_BITS) if consume else words * _GATHER_BITS
    return products.view(torch.uint8).view(-1, 8)[:, _TOP_BYTE].contiguous()


def unpack_bits_as(bits: torch.Tensor, numel: int, table: torch.Tensor) -> torch.Tensor:
    """Expand packed bits through an (256, 8) ``table``: a flat tensor of ``numel`` entries."""
    return torch.nn.functional.embedding(bits.long(), table).view(-1)[:numel]


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: a flat bool tensor of ``numel`` elements."""
    table = _bit_table(bits.device, torch.bool)
    return table.index_select(0, bits.int()).view(-1)[:numel]


# Lloyd-Max quantisers of a unit Gaussian (NOTE [Quantised x_hat] in norm.py): 1 bit keeps the
# sign at +-E|z|; 2 bits add "is |z| above 0.9816", with levels 0.4528 and 1.5104.
STANDARD_LEVELS = {1: (0.7979, 0.7979), 2: (0.4528, 1.5104)}
STANDARD_SPLIT = 0.9816


def quantize_standard(x: torch.Tensor, bits: int, mean: Optional[torch.Tensor] = None,
                      invstd: Optional[torch.Tensor] = None,
                      order: Optional[Tuple[int, ...]] = None):
    """Packed codes of ``(x - mean) * invstd``, an (about) unit-variance tensor: (sign bits,
    magnitude bits or None), its elements taken in ``order`` (NOTE [Memory order]). ``mean``
    and ``invstd`` broadcast against ``x`` (default 0 and 1); the standardised tensor itself is
    never formed."""
    if bits not in STANDARD_LEVELS:
        raise ValueError("bits must be 1 or 2, got %r" % (bits,))
    with torch.no_grad():
        centre = 0.0 if mean is None else mean
        sign = pack_bits(x > centre, consume=True, order=order)
        if bits == 1:
            return sign, None
        split = STANDARD_SPLIT if invstd is None else STANDARD_SPLIT / invstd
        # one float temporary, not two (the difference, then its magnitude in place)
        return sign, pack_bits(torch.sub(x, centre).abs_() > split, consume=True, order=order)


@functools.lru_cache(maxsize=32)
def _level_table(device: torch.device, dtype: torch.dtype, low: float,
                 high: float) -> torch.Tensor:
    """(256, 8) table of ``low`` where a bit is clear and ``high`` where it is set."""
    return low + (high - low) * _bit_table(device, dtype)


@functools.lru_cache(maxsize=16)
def _bit_values(device: torch.device) -> torch.Tensor:
    """The uint8 values of bits 0..7: a mask byte ANDed with them spreads to 8 bytes."""
    return torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=16)
def _byte_table(device: torch.device, inside: int) -> torch.Tensor:
    """(256, 8) uint8 table: 0 where a bit is clear, ``inside`` where it is set."""
    return _bit_table(device, torch.uint8) * inside


def dequantize_standard(sign: torch.Tensor, big: Optional[torch.Tensor], numel: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``numel`` reconstruction levels from ``quantize_standard``'s codes."""
    small, large = STANDARD_LEVELS[1 if big is None else 2]
    if big is None:   # one lookup straight to the levels
        return unpack_bits_as(sign, numel, _level_table(sign.device, dtype, -small, small))
    signs = unpack_bits_as(sign, numel, _level_table(sign.device, dtype, -1.0, 1.0))
    return signs * unpack_bits_as(big, numel, _level_table(big.device, dtype, small, large))


def _self_check() -> None:
    probe = torch.cat([torch.rand(1003) > 0.5, torch.ones(16, dtype=torch.bool)])
    if not torch.equal(unpack_bits(pack_bits(probe), probe.numel()), probe):
        raise RuntimeError("surgeon: bit packing does not round-trip on this platform")


_self_check()


class BitMask(Packed):
    """A tensor whose backward needs only "is it inside (lo, hi)": ReLU, ReLU6, hardtanh.

    NOTE [ReLU masks]
    ReLU's backward is ``grad * (result > 0)``; hardtanh's is ``grad * (lo < x < hi)``. One bit per
    element answers that exactly, so the mask is lossless for the gradient while costing 1/32 of
    an fp32 tensor. ``unpack`` returns a tensor that lies inside the interval where the bit is set
    and on its lower edge elsewhere, which reproduces the same comparison in backward.
    """

    __slots__ = ("bits", "device", "inside", "outside")

    def __init__(self, tensor: torch.Tensor, lo: float = 0.0, hi: float = math.inf):
        super().__init__(tensor.shape, tensor.dtype, tensor.numel(), memory_order(tensor))
        with torch.no_grad():
            inside = tensor > lo
            if not math.isinf(hi):
                inside &= tensor < hi
            self.bits = pack_bits(inside, consume=True, order=self.order)
        self.device = tensor.device
        self.inside = 1.0 if math.isinf(hi) else (lo + hi) / 2.0
        self.outside = lo

    def tensors(self) -> List[torch.Tensor]:
        return [self.bits]

    def unpack(self) -> torch.Tensor:
        if self.outside == 0.0 and self.inside == 1.0:
            # ReLU's: a bit ANDed out of its byte is 0, or its own value, inside (0, inf): one
            # operator where a table lookup takes two (a cast, then the lookup)
            spread = self.bits.unsqueeze(1) & _bit_values(self.device)
            return self._shaped(spread.view(-1)[:self.numel])
        if self.outside == 0.0 and self.inside == 3.0:
            # ReLU6's: the backward ops that read these masks (threshold, leaky ReLU and
            # hardtanh backward) compare them and promote, so bytes do: a quarter of the memory
            table = _byte_table(self.device, int(self.inside))
        else:
            table = _level_table(self.device, self.dtype, self.outside, self.inside)
        return self._shaped(unpack_bits_as(self.bits, self.numel, table))


def _magnitude(flat: torch.Tensor) -> torch.Tensor:
    # NaN counts as the largest magnitude, so it is kept and the caller's NaN guard sees it.
    return torch.nan_to_num(flat.abs(), nan=math.inf)


def select_topk(flat: torch.Tensor, keep: float) -> torch.Tensor:
    """Exact per-tensor top-k by magnitude; returns a bool mask (zeros never selected)."""
    k = min(flat.numel(), int(round(keep * flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.topk(_magnitude(flat), k, sorted=False).indices] = True
    return mask & (flat != 0)


def select_threshold(flat: torch.Tensor, keep: float,
                     sample_size: int = QUANTILE_SAMPLE) -> torch.Tensor:
    """Keep values above a magnitude threshold estimated from a sample's quantile.

    The kept fraction lands within ``sampling_margin(keep, sample_size)`` of ``keep`` (five
    standard errors; about 1.4% at keep 0.5 with 32,768 samples), at a fraction of top-k's cost.
    Ties at zero resolve to "dropped" (zeros are free anyway).

    NOTE [Fixed sample positions]
    The sample is read at positions drawn once per tensor size (``_sample_positions``), not
    drawn every call: one gather where fresh positions cost a random draw too, and four
    operators in all (issue 15: launches). The positions are uniform over the whole tensor, so
    no stride can alias with its layout; the data at them changes every step. What is lost is
    independence between steps: on a static scene the estimate's error (about 0.3% of the
    elements at keep 0.5, with 32,768 samples) repeats instead of averaging out, which the
    capacity's five-sigma margin (``sampling_margin``) covers either way.

    NOTE [Sample size]
    The sample's size buys precision with the selection's time. Where the kept values go to a
    buffer of fixed capacity (NOTE [Sync-free packing]: GPUs), precision is memory, since the
    capacity is padded by five standard errors, and a GPU selects 32,768 values in one kernel;
    there the sample stays at 32,768. Where they are counted exactly (the CPU's form), the
    error only moves the kept fraction a little around ``keep``, and the selection's time is
    the CPU's: in a ResNet-20 step at batch 16, ``kthvalue`` took 8.3 ms on 32,768 values (23
    tensors, 0.1-0.45 ms each on real activations, 2-core x86, one thread) and 2.7 ms on
    8,192, whose working set stays in a core's cache. The standard error doubles, to 0.33% of
    the elements at keep 0.1.
    """
    magnitude = flat.abs()
    n = flat.numel()
    # index_select, not advanced indexing: the same gather, 5-7x faster on the CPU (32,768 of
    # 262,144: 18 against 122 us, one thread)
    # a smaller sample is a prefix of the same positions: i.i.d. draws, so uniform too
    sample = (magnitude.index_select(0, _sample_positions(n, flat.device)[:sample_size])
              if n > sample_size else magnitude)
    drop = min(sample.numel(), max(1, int(round((1.0 - keep) * sample.numel()))))
    # kthvalue orders NaN above every number, so NaN never lowers the threshold; a NaN
    # threshold (most of the sample NaN) keeps nothing, and the loss is NaN upstream anyway
    threshold = torch.kthvalue(sample, drop).values
    return magnitude > threshold


def quantile_sample(sync_free: bool) -> int:
    """The threshold's sample size for a packed form (NOTE [Sample size])."""
    return QUANTILE_SAMPLE if sync_free else EXACT_COUNT_SAMPLE


@functools.lru_cache(maxsize=32)
def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    """QUANTILE_SAMPLE positions uniform over ``numel``: fixed, and the same in every run."""
    draw = torch.Generator().manual_seed(numel)
    return torch.randint(0, numel, (QUANTILE_SAMPLE,), generator=draw).to(device)


class Pruned(Packed):
    """The kept values of a tensor plus where they were; see NOTE [Pruned format]."""

    __slots__ = ("bits", "indices", "values", "device")

    def __init__(self, tensor: torch.Tensor, mask: torch.Tensor, value_dtype: torch.dtype):
        flat, order = _flattened(tensor)
        values = _kept_values(flat, mask, value_dtype)
        super().__init__(tensor.shape, tensor.dtype, values.numel(), order)
        self.device = tensor.device
        self.values = values
        self.bits: Optional[torch.Tensor] = None
        self.indices: Optional[torch.Tensor] = None
        if self.kept * 4 < (self.numel + 7) // 8:
            self.indices = mask.nonzero().view(-1).to(torch.int32)
        else:
            self.bits = pack_bits(mask)

    def tensors(self) -> List[torch.Tensor]:
        held = self.bits if self.bits is not None else self.indices
        return [self.values, held]

    def unpack(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        values = self.values.to(self.dtype)
        if self.bits is not None:
            # 25-45% faster than nonzero and index_copy_ on the CPU (3.3 M elements, one thread:
            # 10-25 against 13-37 ms on torch 2.14, 11-24 against 19-49 ms on torch 2.0)
            out.masked_scatter_(unpack_bits(self.bits, self.numel), values)
        else:
            out.index_copy_(0, self.indices.long(), values)
        return self._shaped(out)


class PrunedFixed(Packed):
    """Bitmask + a value buffer of capacity fixed in advance: packs and unpacks without a host sync.

    NOTE [Sync-free packing]
    Boolean indexing and ``nonzero`` must learn the number of kept values on the host, which on a
    GPU drains the launch queue once per saved tensor and makes a fast step launch-bound. Here the
    capacity comes from the keep ratio (padded for the sampled threshold's error), and a prefix
    sum of the mask numbers the kept values 1, 2, ...: each is scattered to its number's slot,
    every other element to slot 0, which is then zeroed. Unpacking gathers by the same prefix
    sum times the mask, so dropped elements read slot 0's zero and no read goes past the last
    kept value (the buffer is never cleared): five operators each way besides the casts (issue
    15: launches). Values that would overflow the capacity are dropped and their
    mask bits cleared, so mask and values always agree. fp16 values saturate at +-65504 instead
    of falling back to fp32.
    """

    __slots__ = ("bits", "values", "device", "_kept_t")

    def __init__(self, tensor: torch.Tensor, mask: torch.Tensor, capacity: int,
                 value_dtype: torch.dtype):
        flat, order = _flattened(tensor)
        super().__init__(tensor.shape, tensor.dtype, 0, order)
        self.device = tensor.device
        number = torch.cumsum(mask, 0)          # int64: scatter's index type
        # the last number counts them all: a scalar operator where summing the mask is a pass
        self._kept_t = (number[-1].clamp(max=capacity) if flat.numel()
                        else torch.zeros((), dtype=torch.int64, device=self.device))
        mask = mask & (number <= capacity)
        # in place: a second int64 copy of the whole tensor's size would set a GPU's peak;
        # uninitialised slots: unpacking reads none past the last kept value
        slots = flat.new_empty(capacity + 1).scatter_(0, number.mul_(mask), flat)
        del number
        slots[0] = 0
        if value_dtype == torch.float16 and flat.dtype != torch.float16:
            slots.clamp_(-_FP16_MAX, _FP16_MAX)
        self.values = slots.to(value_dtype)     # slot 0 included: unpacking reads its zero
        self.bits = pack_bits(mask, consume=True)   # our own: the capacity-cut copy

    @property
    def kept(self) -> int:
        return int(self._kept_t)  # one sync, only when someone asks

    def kept_lazy(self):
        return self._kept_t

    def tensors(self) -> List[torch.Tensor]:
        return [self.values, self.bits]

    def unpack(self) -> torch.Tensor:
        mask = unpack_bits(self.bits, self.numel)
        number = torch.cumsum(mask, 0).mul_(mask)
        return self._shaped(self.values.to(self.dtype).index_select(0, number))


def capacity_for(numel: int, keep: float, selection: str) -> int:
    """Value slots a sync-free pack reserves: exact for top-k, padded for the sampled threshold."""
    if selection == "threshold" and 0 < keep < 1 and numel > QUANTILE_SAMPLE:
        keep = min(1.0, keep + sampling_margin(keep))
    return int(math.ceil(keep * numel))


def sampling_margin(keep: float, sample_size: int = QUANTILE_SAMPLE) -> float:
    """Five standard errors of a quantile estimated from ``sample_size`` samples, plus slack."""
    return 5.0 * math.sqrt(keep * (1.0 - keep) / sample_size) + 1e-4


# Elements gathered at a time: boolean indexing first lists the kept positions (int64, 8 bytes
# each), so a whole tensor at once would add up to twice its own size to the step's peak (issue
# 15); a chunk's list is at most 2 MiB, and its values are cast before the next is gathered.
_GATHER_CHUNK = 1 << 18


def _kept_values(flat: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``flat[mask]`` in ``dtype`` (in ``flat``'s dtype where fp16 would overflow), gathered a
    chunk at a time.

    NOTE [Exact-count gather]
    Two operators a chunk (the gather and its cast) and two a tensor: fp16's range is checked
    once, on the largest magnitude (the kept values are the largest, so theirs is the
    tensor's), and the cast pieces are joined at the end. Counting each chunk first and
    checking each on its own cost seven a chunk (issue 15: operators a step); a row sum over
    the mask would count them in one, but widens the mask to int64 first.
    """
    if _overflows(flat, dtype):
        dtype = flat.dtype   # rare: a value fp16 cannot hold; kept as it is
    pieces = [chunk[chunk_mask].to(dtype) for chunk, chunk_mask
              in zip(flat.split(_GATHER_CHUNK), mask.split(_GATHER_CHUNK))]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _overflows(flat: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype != torch.float16 or flat.numel() == 0:
        return False
    # one reduction, no magnitude-sized temporary (and 20x faster than an infinity norm on
    # the CPU); NaN compares False and casts as NaN
    low, high = torch.aminmax(flat)
    return float(high) > _FP16_MAX or float(low) < -_FP16_MAX


def prune(tensor: torch.Tensor, keep: float, selection: str = "threshold",
          value_dtype: torch.dtype = torch.float16,
          sync_free: bool = False) -> Packed:
    """Pack ``tensor`` keeping a ``keep`` fraction of its largest-magnitude values.

    Args:
        tensor: a floating-point tensor (any shape).
        keep: fraction in [0, 1]; 0 holds nothing, 1 holds every nonzero value.
        selection: ``"threshold"`` (sampled quantile, fast) or ``"topk"`` (exact).
        value_dtype: dtype of the stored values (fp16 default, fp32 for lossless keep 1).
        sync_free: use the fixed-capacity form (NOTE [Sync-free packing]); for GPUs.

    Raises:
        ValueError: ``keep`` outside [0, 1] or an unknown selection.
    """
    if not 0.0 <= keep <= 1.0 or math.isnan(keep):
        raise ValueError("keep ratio must be in [0, 1], got %r" % (keep,))
    if selection not in SELECTIONS:
        raise ValueError("selection must be one of %s, got %r" % (SELECTIONS, selection))
    if keep == 0.0:
        return Dropped(tensor)
    with torch.no_grad():
        flat, _ = _flattened(tensor)   # the mask in the packed forms' order (NOTE [Memory order])
        if keep >= 1.0:
            mask = (flat != 0) | torch.isnan(flat)
        elif selection == "topk":
            mask = select_topk(flat, keep)
        else:
            mask = select_threshold(flat, keep, quantile_sample(sync_free))
        if sync_free:
            capacity = capacity_for(flat.numel(), keep, selection)
            return PrunedFixed(tensor, mask, capacity, value_dtype)
        return Pruned(tensor, mask, value_dtype)


