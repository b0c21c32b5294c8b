"""Max pooling's indices as one byte per output: the position inside the window.

NOTE [Pool indices]
``max_pool2d`` saves, for every output, the flat int64 position of its maximum in the input plane
(8 bytes each) so that backward can scatter the gradient. That position always lies in the
output's own window, so ``kh * kW + kw`` (the row and column inside the window) says the same in
one byte whenever the window has at most 256 cells; the absolute index is rebuilt from the
output's coordinates, the stride, padding and dilation when backward asks. Lossless: on the CPU
every packing is checked by rebuilding it, and a mismatch keeps the indices as they are.

Both ways are linear in the output's coordinates, so each is one int64 buffer of a part's
size (``_PART`` indices, a few samples) and five in-place operators, the window's offsets
computed once; the check compares part by part. Written as whole-tensor expressions,
packing and its check held up to nine int64 buffers of the indices' size at once, which set
the whole step's peak of a model with a max-pooled stem (torchvision's resnet18 at 224 x 224,
batch 16: 297 MiB, nine 24.5 MiB temporaries over the 99 MiB the forward held; issue 15).
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .sparsity import Exact, Packed

__all__ = ["PoolIndices", "pack_pool_indices", "pool_geometry"]

Pair = Tuple[int, int]
_PART = 1 << 21   # indices worked on at a time: a 16 MiB int64 buffer


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


def _window_origin(out_shape, stride: Pair, padding: Pair, device):
    """(top row, left column) of every output's window: (OH, 1) and (1, OW) int64."""
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
        out = torch.empty_like(self.codes, dtype=torch.int64)
        offset = self._offset()
        for part in _batch_parts(self.codes):
            self._rebuild(part, out[part], offset)
        return out

    def rebuilds(self, indices: torch.Tensor) -> bool:
        """Whether ``unpack`` gives ``indices`` back, checked a part at a time."""
        offset = self._offset()
        for part in _batch_parts(indices):
            restored = torch.empty_like(indices[part])
            self._rebuild(part, restored, offset)
            if not torch.equal(restored, indices[part]):
                return False
        return True

    def _offset(self) -> torch.Tensor:
        """``top * W + left`` of every output's window, (OH, OW)."""
        (_, width), _, stride, padding, _ = self.geometry
        top, left = _window_origin(self.shape, stride, padding, self.codes.device)
        return top * width + left

    def _rebuild(self, part: slice, index: torch.Tensor, offset: torch.Tensor) -> None:
        """The flat positions of ``part`` of the batch, written into ``index``."""
        # row * W + col, row = top + (code // kW) * dh, col = left + (code % kW) * dw
        (_, width), kernel, _, _, (dh, dw) = self.geometry
        codes = self.codes[part]
        index.copy_(torch.div(codes, kernel[1], rounding_mode="floor"))
        index.mul_(dh * width - kernel[1] * dw).add_(codes, alpha=dw).add_(offset)


def pack_pool_indices(indices: torch.Tensor, geometry) -> Packed:
    """The compact form when the window fits a byte (and, on the CPU, when it round-trips)."""
    kernel = geometry[1]
    if kernel[0] * kernel[1] > 256 or indices.dtype != torch.int64:
        return Exact(indices)
    packed = PoolIndices(indices, _window_codes(indices, geometry), geometry)
    if indices.device.type == "cpu" and not packed.rebuilds(indices):
        return Exact(indices)
    return packed


def _window_codes(indices: torch.Tensor, geometry) -> torch.Tensor:
    """``(row - top) / dh * kW + (col - left) / dw`` for every output, as uint8."""
    # times dh * dw, that is row * (kW * dw - W * dh) + index * dh - (top * kW * dw + left * dh)
    (_, width), kernel, stride, padding, (dh, dw) = geometry
    top, left = _window_origin(indices.shape, stride, padding, indices.device)
    offset = top * (kernel[1] * dw) + left * dh
    codes = torch.empty_like(indices, dtype=torch.uint8)
    for part in _batch_parts(indices):
        scaled = torch.div(indices[part], width, rounding_mode="floor")
        scaled.mul_(kernel[1] * dw - width * dh).add_(indices[part], alpha=dh).sub_(offset)
        if dh * dw > 1:
            scaled.div_(dh * dw, rounding_mode="floor")   # exact where the index is valid
        codes[part] = scaled
    return codes


def _batch_parts(tensor: torch.Tensor) -> Iterator[slice]:
    """Slices of a batch holding about ``_PART`` elements each; one for unbatched input."""
    if tensor.dim() != 4 or tensor.shape[0] == 0:
        yield slice(None)
        return
    per = max(1, _PART // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], per):
        yield slice(start, start + per)
