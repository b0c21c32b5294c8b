"""CoTTA's test-time augmentation for CIFAR, on a batch tensor (one draw for the whole batch).

Chain: clip; brightness, contrast, saturation, hue and gamma jitter in random order; edge-pad half
the size; random affine (+-15 deg, translate 1/16, scale 0.9-1.1); Gaussian blur (kernel 5,
sigma 0.001-0.5); centre crop; horizontal flip with p 0.5; Gaussian noise sigma 0.005; clip.
Upstream: qinenergy/cotta (my_transforms.py); SURGEON's consistency loss uses the same chain.
"""

import functools
import math
import random
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Draw", "affine", "blur_valid", "cotta_augment", "device_draw", "host_draw",
           "jitter_order"]

Number = Union[float, torch.Tensor]   # a float drawn on the host, or a 0-dim tensor


BLUR_TAPS = 5
NOISE_SIGMA = 0.005
_TINY = 1e-12


def _adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    """TF.adjust_hue's HSV round trip in about fifteen whole-batch operators (issue 15: its
    version is some sixty per call and holds about 25 copies of its input; chunked for memory,
    it was 462 of the daemon recipe's 2,414 operators a step at batch 200).

    Hue in sextants from the brightest channel (v) and the chroma C = v - min:
    max r: (g - b) / C, max g: 2 + (b - r) / C, max b: 4 + (r - g) / C (where two channels tie
    for brightest both formulas agree). Back to RGB with the closed form of torchvision's sector
    table, channel by channel n = 5, 3, 1 for r, g, b, with v * s = C:
    k = (n + 6h) mod 6, out = v - C * clamp(min(k, 4 - k), 0, 1).
    """
    if x.shape[-3] == 1:    # grayscale has no hue (as torchvision)
        return x
    minuend, subtrahend, offsets, channel_n = _hue_constants(x.device, x.dtype)
    value, brightest = x.max(dim=-3, keepdim=True)
    chroma = value - x.amin(dim=-3, keepdim=True)
    candidates = (x.index_select(-3, minuend) - x.index_select(-3, subtrahend)) \
        / chroma.clamp(min=_TINY) + offsets
    sextant = candidates.gather(-3, brightest).add_(6.0 + 6.0 * factor).remainder_(6.0)
    k = (sextant + channel_n).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(value, chroma, ramp, value=-1.0)


@functools.lru_cache(maxsize=8)
def _hue_constants(device: torch.device, dtype: torch.dtype):
    """Channels (g, b, r) minus (b, r, g), the sextant offsets, and n for r, g, b."""
    column = dict(device=device, dtype=dtype)
    return (torch.tensor([1, 2, 0], device=device), torch.tensor([2, 0, 1], device=device),
            torch.tensor([0.0, 2.0, 4.0], **column).view(3, 1, 1),
            torch.tensor([5.0, 3.0, 1.0], **column).view(3, 1, 1))


def _blend(x: torch.Tensor, other, factor) -> torch.Tensor:
    """torchvision's ``_blend`` for float images: ``factor`` a float or a 0-dim tensor."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma (ITU-R 601-2) as one channel."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


# the colour jitters in CoTTA's list order, each with its factor's range
JITTERS = (
    (lambda x, f: (f * x).clamp(0.0, 1.0), (0.6, 1.4)),                          # brightness
    (lambda x, f: _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f), (0.7, 1.3)),
    (lambda x, f: _blend(x, _grey(x), f), (0.5, 1.5)),                            # saturation
    (lambda x, f: _adjust_hue(x, f), (-0.06, 0.06)),
    (lambda x, f: x.clamp(1e-8, 1.0) ** f, (0.7, 1.3)),                           # gamma
)
ANGLE, SCALE, SIGMA, FLIP_P = 15.0, (0.9, 1.1), (0.001, 0.5), 0.5


class Draw(NamedTuple):
    """One augmentation's random choices (NOTE [Drawn on the device]). ``factors`` are the
    jitters' in ``JITTERS`` order, applied in ``order``; ``noise`` is a seed, or the generator
    the noise comes from (None: torch's default)."""

    order: Tuple[int, ...]
    factors: Tuple[Number, ...]
    angle: Number
    translate: Tuple[Number, Number]
    scale: Number
    sigma: Number
    flip: Union[bool, torch.Tensor]
    noise: Union[int, torch.Generator, None]


def jitter_order(rng: Optional[random.Random] = None) -> Tuple[int, ...]:
    """The order the jitters run in: shuffled by ``rng``, else CoTTA's list order."""
    order = list(range(len(JITTERS)))
    if rng is not None:
        rng.shuffle(order)
    return tuple(order)


def host_draw(rng: random.Random, width: int) -> Draw:
    """Python floats from ``rng``, in the order CoTTA's chain draws them."""
    order = jitter_order(rng)
    factors = [0.0] * len(JITTERS)
    for index in order:   # each jitter draws its factor when it runs
        factors[index] = rng.uniform(*JITTERS[index][1])
    shift = width / 16.0
    angle = rng.uniform(-ANGLE, ANGLE)
    translate = tuple(int(round(rng.uniform(-shift, shift))) for _ in range(2))
    return Draw(order, tuple(factors), angle, translate, rng.uniform(*SCALE),
                rng.uniform(*SIGMA), rng.random() < FLIP_P, rng.getrandbits(63))


def device_draw(x: torch.Tensor, order: Sequence[int],
                generator: Optional[torch.Generator] = None) -> Draw:
    """NOTE [Drawn on the device]
    A CUDA graph replays the kernels it captured with the values they had: Python floats drawn
    on the host would repeat the capture's augmentation at every replay. Here every draw is one
    ``torch.rand`` on ``x``'s device, which a graph redraws at each replay (torch's default CUDA
    generator advances its offset per replay), and no draw is read on the host. The one choice
    that cannot be a tensor is the jitters' ``order``: the caller draws it when it captures.
    ``generator`` None is torch's default (the only one a capture in torch 2.0 accepts)."""
    lows, spans, rounded = _draw_ranges(x.device, x.dtype, x.shape[-1])
    values = torch.rand(lows.shape, device=x.device, dtype=x.dtype, generator=generator) \
        .mul_(spans).add_(lows)
    *factors, angle, shift_x, shift_y, scale, sigma, flip = \
        torch.where(rounded, values.round(), values).unbind()
    return Draw(tuple(order), tuple(factors), angle, (shift_x, shift_y), scale, sigma,
                flip < FLIP_P, generator)


@functools.lru_cache(maxsize=8)
def _draw_ranges(device: torch.device, dtype: torch.dtype, width: int):
    """(lows, spans, which to round) of the jitters, angle, translation, scale, sigma, flip:
    ``device_draw``'s fields in its order. The translation is in whole pixels."""
    shift = (-width / 16.0, width / 16.0, True)
    ranges = [r + (False,) for _, r in JITTERS] + [
        (-ANGLE, ANGLE, False), shift, shift, SCALE + (False,), SIGMA + (False,),
        (0.0, 1.0, False)]
    column = dict(device=device, dtype=dtype)
    return (torch.tensor([lo for lo, _, _ in ranges], **column),
            torch.tensor([hi - lo for lo, hi, _ in ranges], **column),
            torch.tensor([whole for _, _, whole in ranges], device=device))


def affine(x: torch.Tensor, angle: Number, translate: Tuple[Number, Number],
           scale: Number) -> torch.Tensor:
    """``TF.affine`` about the centre with bilinear sampling and zero fill, no shear, for
    floats or 0-dim tensors: torchvision's inverse matrix (rotation by -angle, 1 / scale,
    translation undone) mapped to ``grid_sample``'s coordinates (``align_corners=False``)."""
    height, width = x.shape[-2:]
    radians = angle * (math.pi / 180.0)
    cos, sin = (radians.cos(), radians.sin()) if torch.is_tensor(radians) else \
        (math.cos(radians), math.sin(radians))
    m00, m01, m10, m11 = cos / scale, sin / scale, -sin / scale, cos / scale
    tx, ty = translate
    across, down = _pixel_centres(height, width, x.device, x.dtype)
    grid_x = (m00 * across + m01 * down - (m00 * tx + m01 * ty)) * (2.0 / width)
    grid_y = (m10 * across + m11 * down - (m10 * tx + m11 * ty)) * (2.0 / height)
    grid = torch.stack((grid_x, grid_y), dim=-1).expand(x.shape[0], height, width, 2)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int, device: torch.device, dtype: torch.dtype):
    """Pixel centres from the image's centre: a row (1, 1, W) and a column (1, H, 1)."""
    across = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width, device=device,
                            dtype=dtype)
    down = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height, device=device,
                          dtype=dtype)
    return across.view(1, 1, width), down.view(1, height, 1)


def blur_valid(x: torch.Tensor, sigma: Number) -> torch.Tensor:
    """TF.gaussian_blur's kernel (5 taps) as two passes of shifted sums, without padding: the
    result is ``BLUR_TAPS - 1`` pixels smaller each way. conv2d on the CPU unfolds its input
    (25 copies of it), the largest transient of the whole consistency step."""
    half = (BLUR_TAPS - 1) / 2.0
    if torch.is_tensor(sigma):   # drawn on the device (NOTE [Drawn on the device])
        offsets = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - half
        taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
        taps = (taps / taps.sum()).unbind()
    else:
        taps = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(BLUR_TAPS)]
        taps = [t / sum(taps) for t in taps]
    rows = x.shape[-2] - BLUR_TAPS + 1
    out = sum(t * x[..., i:i + rows, :] for i, t in enumerate(taps))
    cols = x.shape[-1] - BLUR_TAPS + 1
    return sum(t * out[..., i:i + cols] for i, t in enumerate(taps))


def cotta_augment(x: torch.Tensor, rng: Optional[random.Random] = None,
                  draw: Optional[Draw] = None) -> torch.Tensor:
    """One augmented copy of a [0, 1] NCHW batch; the same random draw for every image: from
    ``rng`` (the host), or ``draw`` as given (``device_draw``: NOTE [Drawn on the device])."""
    draw = draw or host_draw(rng or random.Random(), x.shape[-1])
    height, width = x.shape[-2:]
    x = x.clamp(0.0, 1.0)
    for index in draw.order:
        x = JITTERS[index][0](x, draw.factors[index])
    pad_h, pad_w = height // 2, width // 2
    x = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    x = affine(x, draw.angle, draw.translate, draw.scale)
    # the centre crop with the blur's margin, then the blur: the same pixels as blurring the
    # padded image and cropping, without blurring what the crop drops
    margin = BLUR_TAPS // 2
    x = x[..., pad_h - margin:pad_h + height + margin, pad_w - margin:pad_w + width + margin]
    x = blur_valid(x, draw.sigma)
    if torch.is_tensor(draw.flip):
        x = torch.where(draw.flip, x.flip(-1), x)
    elif draw.flip:
        x = x.flip(-1)
    # host draws seed their own generator, not torch's global one: a method's results then do
    # not depend on what else ran in the process (rdumb matches its method until a reset)
    noise = draw.noise
    if isinstance(noise, int):
        noise = torch.Generator(device=x.device).manual_seed(noise)
    return (x + torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
            * NOISE_SIGMA).clamp(0.0, 1.0)
