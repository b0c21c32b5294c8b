"""Max pooling's indices as one byte per output: the position inside the window.

NOTE [Pool indices]
``max_pool2d`` saves, for every output, the flat int64 position of its maximum in the input plane
(8 bytes each) so that backward can scatter the gradient. That position always lies in the
output's own window, so ``kh * kW + kw`` (the row and column inside the window) says the same in
one byte whenever the window has at most 256 cells; the absolute index is rebuilt from the
output's coordinates, the stride, padding and dilation when backward asks. Lossless: on the CPU
every packing is checked by rebuilding it, and a mismatch keeps the indices as they are.

Both ways work a few samples at a time (``_CHUNK`` indices), in two int64 buffers of the
chunk's size, in place, and the check compares chunk by chunk: written as whole-tensor
expressions, packing and its check held up to nine int64 buffers of the indices' size at once,
which set the whole step's peak of a model with a max-pooled stem (torchvision's resnet18 at
224 x 224, batch 16: 297 MiB, nine 24.5 MiB temporaries over the 99 MiB the forward held;
issue 15).
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .sparsity import Exact, Packed

__all__ = ["PoolIndices", "pack_pool_indices", "pool_geometry"]

Pair = Tuple[int, int]
_CHUNK = 1 << 20   # indices worked on at a time: 8 MiB in each int64 buffer


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
        origin = _window_origin(self.shape, *self.geometry[2:], self.codes.device)
        out = torch.empty_like(self.codes, dtype=torch.int64)
        for part in _batch_parts(self.codes):
            out[part] = self._positions(part, origin)
        return out

    def _positions(self, part: slice, origin) -> torch.Tensor:
        """The flat input positions of the outputs in ``part`` of the batch."""
        (_, width), kernel, _, _, dilation = self.geometry
        cols = self.codes[part].long()
        rows = torch.div(cols, kernel[1], rounding_mode="floor")
        cols.remainder_(kernel[1])
        if dilation != (1, 1):
            rows.mul_(dilation[0])
            cols.mul_(dilation[1])
        rows.add_(origin[0]).mul_(width).add_(origin[1])
        return rows.add_(cols)


def pack_pool_indices(indices: torch.Tensor, geometry) -> Packed:
    """The compact form when the window fits a byte (and, on the CPU, when it round-trips)."""
    kernel = geometry[1]
    if kernel[0] * kernel[1] > 256 or indices.dtype != torch.int64:
        return Exact(indices)
    origin = _window_origin(indices.shape, *geometry[2:], indices.device)
    packed = PoolIndices(indices, _window_codes(indices, geometry, origin), geometry)
    if indices.device.type == "cpu" and not all(
            torch.equal(packed._positions(part, origin), indices[part])
            for part in _batch_parts(indices)):
        return Exact(indices)
    return packed


def _batch_parts(tensor: torch.Tensor) -> Iterator[slice]:
    """Slices of a batch holding about ``_CHUNK`` elements each; one for unbatched input."""
    if tensor.dim() != 4 or tensor.shape[0] == 0:
        yield slice(None)
        return
    per = max(1, _CHUNK // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], per):
        yield slice(start, start + per)


def _window_codes(indices: torch.Tensor, geometry, origin) -> torch.Tensor:
    """``row * kernel width + column`` inside each output's window, as uint8."""
    codes = torch.empty_like(indices, dtype=torch.uint8)
    for part in _batch_parts(indices):
        codes[part] = _codes_of(indices[part], geometry, origin)
    return codes


def _codes_of(indices: torch.Tensor, geometry, origin) -> torch.Tensor:
    (_, width), kernel, _, _, dilation = geometry
    rows = torch.div(indices, width, rounding_mode="floor")
    cols = torch.mul(rows, -width).add_(indices)   # indices % width, without a third buffer
    rows.sub_(origin[0])
    cols.sub_(origin[1])
    if dilation != (1, 1):
        rows.div_(dilation[0], rounding_mode="floor")
        cols.div_(dilation[1], rounding_mode="floor")
    return rows.mul_(kernel[1]).add_(cols)
