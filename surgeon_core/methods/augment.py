"""CoTTA's test-time augmentation for CIFAR, on a batch tensor (one draw for the whole batch).

Chain: clip; brightness, contrast, saturation, hue and gamma jitter in random order; edge-pad half
the size; random affine (+-15 deg, translate 1/16, scale 0.9-1.1); Gaussian blur (kernel 5,
sigma 0.001-0.5); centre crop; horizontal flip with p 0.5; Gaussian noise sigma 0.005; clip.
Upstream: qinenergy/cotta (my_transforms.py); SURGEON's consistency loss uses the same chain.
"""

import functools
import math
import random
from typing import Optional

import torch
import torchvision.transforms.functional as TF

__all__ = ["blur_valid", "cotta_augment"]


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


def _jitter(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    ops = [
        lambda t: TF.adjust_brightness(t, rng.uniform(0.6, 1.4)),
        lambda t: TF.adjust_contrast(t, rng.uniform(0.7, 1.3)),
        lambda t: TF.adjust_saturation(t, rng.uniform(0.5, 1.5)),
        lambda t: _adjust_hue(t, rng.uniform(-0.06, 0.06)),
        lambda t: t.clamp(1e-8, 1.0) ** rng.uniform(0.7, 1.3),
    ]
    rng.shuffle(ops)
    for op in ops:
        x = op(x)
    return x


def blur_valid(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """TF.gaussian_blur's kernel (5 taps) as two passes of shifted sums, without padding: the
    result is ``BLUR_TAPS - 1`` pixels smaller each way. conv2d on the CPU unfolds its input
    (25 copies of it), the largest transient of the whole consistency step."""
    half = (BLUR_TAPS - 1) / 2.0
    taps = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(BLUR_TAPS)]
    taps = [t / sum(taps) for t in taps]
    rows = x.shape[-2] - BLUR_TAPS + 1
    out = sum(t * x[..., i:i + rows, :] for i, t in enumerate(taps))
    cols = x.shape[-1] - BLUR_TAPS + 1
    return sum(t * out[..., i:i + cols] for i, t in enumerate(taps))


def cotta_augment(x: torch.Tensor, rng: Optional[random.Random] = None) -> torch.Tensor:
    """One augmented copy of a [0, 1] NCHW batch; the same random draw for every image."""
    rng = rng or random.Random()
    height, width = x.shape[-2:]
    x = _jitter(x.clamp(0.0, 1.0), rng)
    pad_h, pad_w = height // 2, width // 2
    x = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    shift = width / 16.0
    x = TF.affine(x, angle=rng.uniform(-15, 15),
                  translate=[int(round(rng.uniform(-shift, shift))) for _ in range(2)],
                  scale=rng.uniform(0.9, 1.1), shear=[0.0],
                  interpolation=TF.InterpolationMode.BILINEAR)
    # the centre crop with the blur's margin, then the blur: the same pixels as blurring the
    # padded image and cropping, without blurring what the crop drops
    margin = BLUR_TAPS // 2
    x = x[..., pad_h - margin:pad_h + height + margin, pad_w - margin:pad_w + width + margin]
    x = blur_valid(x, rng.uniform(0.001, 0.5))
    if rng.random() < 0.5:
        x = TF.hflip(x)
    # the noise drawn from ``rng`` too, not torch's global generator: a method's results then
    # do not depend on what else ran in the process (rdumb matches its method until a reset)
    noise = torch.Generator(device=x.device).manual_seed(rng.getrandbits(63))
    return (x + torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
            * NOISE_SIGMA).clamp(0.0, 1.0)
