"""Frost textures for the frost corruption: frost1..5 of the ``imagecorruptions`` package.

The package itself does not import on current libraries, so its data files are located through the
installed distribution's file list and read with Pillow; the package's code is never imported.
Install it without its dependencies: ``pip install --no-deps imagecorruptions==1.1.2``.
"""

import functools
from typing import Tuple

import numpy as np

from ..errors import DataNotFound

__all__ = ["frost_textures"]

_NAMES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_SCALE = 0.2  # the CIFAR generator shrinks the textures to a fifth


@functools.lru_cache(maxsize=1)
def frost_textures() -> Tuple[np.ndarray, ...]:
    """The five textures as float RGB in [0, 1], shrunk to a fifth (the CIFAR-10-C recipe)."""
    from importlib import metadata

    from PIL import Image

    try:
        files = {f.name: f for f in metadata.distribution("imagecorruptions").files or []}
    except metadata.PackageNotFoundError:
        files = {}
    missing = [n for n in _NAMES if n not in files]
    if missing:
        raise DataNotFound("frost textures %s not found: install them with "
                           "`pip install --no-deps imagecorruptions==1.1.2`" % ", ".join(missing))
    out = []
    for name in _NAMES:
        with Image.open(files[name].locate()) as im:
            im = im.convert("RGB")
            size = (int(round(im.width * _SCALE)), int(round(im.height * _SCALE)))
            out.append(np.asarray(im.resize(size, Image.BILINEAR), dtype=np.float64) / 255.0)
    return tuple(out)
