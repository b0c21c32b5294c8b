"""The 15 CIFAR-10-C corruptions, written for batches of 32x32 images, with CIFAR severities.

Parameters are the CIFAR-10-C tables of Hendrycks & Dietterich (severities 1..5; severity 5 as in
../shared/research/baselines.md section 7). Differences from the reference generator, on purpose:
  * motion blur (and the snow streaks) use a Gaussian-weighted line kernel in NumPy instead of
    ImageMagick's MagickMotionBlurImage;
  * every random draw comes from one seeded generator, so a corrupted set is reproducible;
  * frost textures come from the ``imagecorruptions`` package's data files (frost1..5).
Inputs and outputs are uint8 NHWC; work happens on float [0, 1]; results are truncated to uint8
like the reference (``np.uint8`` of values in [0, 255]).
"""

import io
import math
from typing import Callable, Dict, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["CORRUPTIONS", "SEVERITY_PARAMS", "corrupt"]

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")

_S = 32  # CIFAR image size
SEVERITY_PARAMS: Dict[str, Tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": ((0, 0, _S * 0.08), (_S * 0.05, _S * 0.2, _S * 0.07),
                          (_S * 0.08, _S * 0.06, _S * 0.06), (_S * 0.1, _S * 0.04, _S * 0.05),
                          (_S * 0.1, _S * 0.03, _S * 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def _gaussian_noise(x, c, rng):
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, c, rng):
    return rng.poisson(x * c) / float(c)


def _impulse_noise(x, c, rng):
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _blur_channels(x, sigma, mode="nearest", truncate=4.0):
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=mode, truncate=truncate)


def _defocus_kernel(radius, alias_blur):
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    yy, xx = np.meshgrid(span, span)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))  # 3x3 Gaussian, like cv2
    taps /= taps.sum()
    disk = ndimage.correlate1d(disk, taps, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, taps, axis=1, mode="mirror")


def _defocus_blur(x, c, rng):
    kernel = _defocus_kernel(*c)[None, :, :, None]
    return ndimage.correlate(x, kernel, mode="mirror")


def _glass_blur(x, c, rng):
    sigma, delta, iterations = c
    img = np.floor(np.clip(_blur_channels(x, sigma), 0, 1) * 255)
    rows = np.arange(len(img))
    # The reference "swaps" pixels with a tuple assignment of two NumPy views, which copies the
    # neighbour into (h, w) and leaves the neighbour as it was; CIFAR-10-C was made that way.
    for _ in range(iterations):
        for h in range(_S - delta, delta, -1):
            for w in range(_S - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2, len(img)))
                img[:, h, w] = img[rows, h + dy, w + dx]
    return _blur_channels(img / 255.0, sigma)


def _motion_kernel(radius, sigma):
    taps = np.exp(-np.arange(2 * radius + 1) ** 2 / (2.0 * sigma ** 2))
    return taps / taps.sum()


def _shift_edge(img, dy, dx):
    """Shift (H, W, ...) by whole pixels, repeating the edge (no wrap)."""
    h, w = img.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return img[ys][:, xs]


def _motion_blur_one(img, radius, sigma, angle_deg):
    """One-sided Gaussian-weighted streak along ``angle`` (ImageMagick's motion blur, in NumPy)."""
    taps = _motion_kernel(radius, sigma)
    angle = math.radians(angle_deg)
    out = np.zeros_like(img)
    for i, weight in enumerate(taps):
        dy = -math.ceil(i * math.sin(angle) - 0.5)
        dx = -math.ceil(i * math.cos(angle) - 0.5)
        if abs(dy) >= img.shape[0] or abs(dx) >= img.shape[1]:
            break
        out += weight * _shift_edge(img, dy, dx)
    return out


def _motion_blur(x, c, rng):
    angles = rng.uniform(-45, 45, size=len(x))
    return np.stack([_motion_blur_one(img, c[0], c[1], a) for img, a in zip(x, angles)])


def _clipped_zoom(x, factor):
    """Zoom the centre of a (N, H, W, C) batch by ``factor`` and crop back to H x W."""
    h = x.shape[1]
    ch = int(math.ceil(h / factor))
    top = (h - ch) // 2
    zoomed = ndimage.zoom(x[:, top:top + ch, top:top + ch], (1, factor, factor, 1), order=1)
    trim = (zoomed.shape[1] - h) // 2
    return zoomed[:, trim:trim + h, trim:trim + h]


def _zoom_blur(x, c, rng):
    out = np.zeros_like(x)
    for factor in c:
        out += _clipped_zoom(x, factor)
    return (x + out) / (len(c) + 1)


def _gray(x):
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _snow(x, c, rng):
    loc, scale, zoom, cut, radius, sigma, mix = c
    layer = rng.normal(loc=loc, scale=scale, size=x.shape[:3] + (1,))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < cut] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255.0
    angles = rng.uniform(-135, -45, size=len(x))
    layer = np.stack([_motion_blur_one(s, radius, sigma, a) for s, a in zip(layer, angles)])
    x = mix * x + (1 - mix) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2, axes=(1, 2))


def _frost(x, c, rng):
    from .frost import frost_textures

    textures = frost_textures()
    out = np.empty_like(x)
    for i, img in enumerate(x):
        tex = textures[rng.integers(len(textures))]
        top = rng.integers(0, tex.shape[0] - _S)
        left = rng.integers(0, tex.shape[1] - _S)
        out[i] = c[0] * img + c[1] * tex[top:top + _S, left:left + _S]
    return out


def _plasma_fractal(rng, mapsize=32, decay=3.0):
    """Diamond-square height map in [0, 1], (mapsize, mapsize)."""
    grid = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[0:mapsize:step, 0:mapsize:step]
        mean = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1)
                + np.roll(np.roll(corners, -1, 0), -1, 1)) / 4
        grid[half:mapsize:step, half:mapsize:step] = mean + rng.uniform(-wibble, wibble, mean.shape)
        centres = grid[half:mapsize:step, half:mapsize:step]
        edges_h = corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)
        grid[0:mapsize:step, half:mapsize:step] = edges_h / 4 + rng.uniform(-wibble, wibble,
                                                                            mean.shape)
        edges_v = corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)
        grid[half:mapsize:step, 0:mapsize:step] = edges_v / 4 + rng.uniform(-wibble, wibble,
                                                                            mean.shape)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _fog(x, c, rng):
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    fog = np.stack([_plasma_fractal(rng, 32, c[1]) for _ in range(len(x))])[..., None]
    return (x + c[0] * fog) * peak / (peak + c[0])


def _rgb_to_hsv(x):
    v = x.max(-1)
    delta = v - x.min(-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0)
    d = np.where(delta > 0, delta, 1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv):
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [ch[k] for ch in choices]) for k in range(3)], -1)


def _brightness(x, c, rng):
    hsv = _rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _hsv_to_rgb(hsv)


def _contrast(x, c, rng):
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def _elastic_one(img, c, rng):
    alpha, sigma, jitter = c
    centre, size = _S // 2, _S // 3
    src = np.array([[centre + size, centre + size], [centre + size, centre - size],
                    [centre - size, centre - size]], dtype=np.float64)  # (x, y) points
    dst = src + rng.uniform(-jitter, jitter, size=src.shape)
    forward = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # 2x3: (x, y, 1) -> (x', y')
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    # output (row, col) -> input (row, col): swap the x/y roles of the inverse map
    matrix = inverse[[1, 0]][:, [1, 0]]
    offset = inverse[[1, 0], 2]
    warped = np.stack([ndimage.affine_transform(img[..., k], matrix, offset, order=1,
                                                mode="mirror") for k in range(3)], -1)
    dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, size=(_S, _S)), sigma, mode="reflect",
                                      truncate=3) * alpha for _ in range(2))
    yy, xx = np.meshgrid(np.arange(_S), np.arange(_S), indexing="ij")
    coords = [yy + dy, xx + dx]
    return np.stack([ndimage.map_coordinates(warped[..., k], coords, order=1, mode="reflect")
                     for k in range(3)], -1)


def _elastic_transform(x, c, rng):
    return np.stack([_elastic_one(img, c, rng) for img in x])


def _pil_roundtrip(x, fn):
    from PIL import Image

    out = np.empty_like(x)
    for i, img in enumerate(np.uint8(np.clip(x, 0, 1) * 255)):
        out[i] = np.asarray(fn(Image.fromarray(img)), dtype=np.float64) / 255.0
    return out


def _pixelate(x, c, rng):
    from PIL import Image

    small = int(_S * c)
    return _pil_roundtrip(x, lambda im: im.resize((small, small), Image.BOX)
                          .resize((_S, _S), Image.BOX))


def _jpeg(x, c, rng):
    from PIL import Image

    def roundtrip(im):
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=c)
        return Image.open(buffer)

    return _pil_roundtrip(x, roundtrip)


_FUNCTIONS: Dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog,
    "brightness": _brightness, "contrast": _contrast, "elastic_transform": _elastic_transform,
    "pixelate": _pixelate, "jpeg_compression": _jpeg,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to uint8 NHWC images; deterministic by seed.

    Raises:
        ValueError: an unknown corruption, a severity outside 1..5 or images not (N, 32, 32, 3).
    """
    if name not in _FUNCTIONS:
        raise ValueError("unknown corruption %r; known: %s" % (name, ", ".join(CORRUPTIONS)))
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError("severity must be 1..5, got %r" % (severity,))
    if images.ndim != 4 or images.shape[1:] != (_S, _S, 3) or images.dtype != np.uint8:
        raise ValueError("images must be uint8 (N, 32, 32, 3), got %s %s"
                         % (images.dtype, images.shape))
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    x = images.astype(np.float64) / 255.0
    out = _FUNCTIONS[name](x, SEVERITY_PARAMS[name][severity - 1], rng)
    return np.uint8(np.clip(out, 0, 1) * 255)
