"""CoTTA's test-time augmentation for CIFAR, on a batch tensor (one draw for the whole batch).

Chain: clip; brightness, contrast, saturation, hue and gamma jitter in random order; edge-pad half
the size; random affine (+-15 deg, translate 1/16, scale 0.9-1.1); Gaussian blur (kernel 5,
sigma 0.001-0.5); centre crop; horizontal flip with p 0.5; Gaussian noise sigma 0.005; clip.
Upstream: qinenergy/cotta (my_transforms.py); SURGEON's consistency loss uses the same chain.
"""

import random
from typing import Optional

import torch
import torchvision.transforms.functional as TF

__all__ = ["cotta_augment"]


def _jitter(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    ops = [
        lambda t: TF.adjust_brightness(t, rng.uniform(0.6, 1.4)),
        lambda t: TF.adjust_contrast(t, rng.uniform(0.7, 1.3)),
        lambda t: TF.adjust_saturation(t, rng.uniform(0.5, 1.5)),
        lambda t: TF.adjust_hue(t, rng.uniform(-0.06, 0.06)),
        lambda t: t.clamp(1e-8, 1.0) ** rng.uniform(0.7, 1.3),
    ]
    rng.shuffle(ops)
    for op in ops:
        x = op(x)
    return x


def cotta_augment(x: torch.Tensor, rng: Optional[random.Random] = None) -> torch.Tensor:
    """One augmented copy of a [0, 1] NCHW batch; the same random draw for every image."""
    rng = rng or random.Random()
    size = x.shape[-1]
    x = _jitter(x.clamp(0.0, 1.0), rng)
    pad = size // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    shift = size / 16.0
    x = TF.affine(x, angle=rng.uniform(-15, 15),
                  translate=[int(round(rng.uniform(-shift, shift))) for _ in range(2)],
                  scale=rng.uniform(0.9, 1.1), shear=[0.0],
                  interpolation=TF.InterpolationMode.BILINEAR)
    x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[rng.uniform(0.001, 0.5)] * 2)
    x = TF.center_crop(x, [size, size])
    if rng.random() < 0.5:
        x = TF.hflip(x)
    return (x + torch.randn_like(x) * 0.005).clamp(0.0, 1.0)
