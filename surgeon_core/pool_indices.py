"""Max pooling's indices as one byte per output: the position inside the window.

NOTE [Pool indices]
``max_pool2d`` saves, for every output, the flat int64 position of its maximum in the input plane
(8 bytes each) so that backward can scatter the gradient. That position always lies in the
output's own window, so ``kh * kW + kw`` (the row and column inside the window) says the same in
one byte whenever the window has at most 256 cells; the absolute index is rebuilt from the
output's coordinates, the stride, padding and dilation when backward asks. Lossless: on the CPU
every packing is checked by rebuilding it, and a mismatch keeps the indices as they are.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from .sparsity import Exact, Packed

__all__ = ["PoolIndices", "pack_pool_indices", "pool_geometry"]

Pair = Tuple[int, int]


def _pair(value, default: int) -> Pair:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def pool_geometry(args: Sequence, kwargs) -> Optional[Tuple[Pair, Pair, Pair, Pair, Pair]]:
    """(input H, W), kernel, stride, padding, dilation of an F.max_pool2d call; None if not 2-D."""
    names = ("input", "kernel_size", "stride", "padding", "dilation")
    values = [kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)]
    x = values[0]
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or values[1] is None:
        return None
    kernel = _pair(values[1], 1)
    stride = _pair(values[2], 0) if values[2] not in (None, [], ()) else kernel
    return (tuple(x.shape[-2:]), kernel, stride, _pair(values[3], 0), _pair(values[4], 1))


def _window_origin(out_shape, stride: Pair, padding: Pair, dilation: Pair, device):
    oh = torch.arange(out_shape[-2], device=device).view(-1, 1)
    ow = torch.arange(out_shape[-1], device=device).view(1, -1)
    return oh * stride[0] - padding[0], ow * stride[1] - padding[1]


class PoolIndices(Packed):
    """uint8 window positions; ``unpack`` rebuilds the int64 flat indices."""

    __slots__ = ("codes", "geometry")

    def __init__(self, indices: torch.Tensor, codes: torch.Tensor, geometry):
        super().__init__(indices.shape, indices.dtype, indices.numel())
        self.codes, self.geometry = codes, geometry

    def tensors(self) -> List[torch.Tensor]:
        return [self.codes]

    def unpack(self) -> torch.Tensor:
        (_, width), kernel, stride, padding, dilation = self.geometry
        top, left = _window_origin(self.shape, stride, padding, dilation, self.codes.device)
        codes = self.codes.long()
        rows = top + (codes // kernel[1]) * dilation[0]
        cols = left + (codes % kernel[1]) * dilation[1]
        return rows * width + cols


def pack_pool_indices(indices: torch.Tensor, geometry) -> Packed:
    """The compact form when the window fits a byte (and, on the CPU, when it round-trips)."""
    (_, width), kernel, stride, padding, dilation = geometry
    if kernel[0] * kernel[1] > 256 or indices.dtype != torch.int64:
        return Exact(indices)
    top, left = _window_origin(indices.shape, stride, padding, dilation, indices.device)
    rows, cols = indices // width, indices % width
    codes = ((rows - top) // dilation[0]) * kernel[1] + (cols - left) // dilation[1]
    packed = PoolIndices(indices, codes.to(torch.uint8), geometry)
    if indices.device.type == "cpu" and not torch.equal(packed.unpack(), indices):
        return Exact(indices)
    return packed
