"""synthetic://?width=W&height=H&fps=F&frames=N&seed=S: generated frames, no device needed."""

import time
from typing import Dict, Optional

import numpy as np

from .base import EndOfStream, Frame, FrameSource
from .params import QueryParams

__all__ = ["SyntheticSource"]


class SyntheticSource(FrameSource):
    """Smooth random colour fields plus noise at a fixed rate (0 = as fast as read)."""

    live = False

    def __init__(self, uri: str, params: Dict[str, str]):
        super().__init__(uri)
        query = QueryParams("synthetic", params, ("width", "height", "fps", "frames", "seed"))
        self.width = query.integer("width", 64, 1, 8192)
        self.height = query.integer("height", 64, 1, 8192)
        self.fps = query.fps()
        self.frames: Optional[int] = query.integer("frames", None, 1, 10 ** 12)
        self.seed = query.integer("seed", 0, 0, 2 ** 32 - 1)
        self._rng = np.random.default_rng(self.seed)
        self._index = 0
        self._next_due = 0.0

    def open(self) -> None:
        self._next_due = time.monotonic()

    def read(self) -> Frame:
        if self.frames is not None and self._index >= self.frames:
            raise EndOfStream(self.uri)
        if self.fps > 0:
            self._next_due += 1.0 / self.fps
            time.sleep(max(0.0, self._next_due - time.monotonic()))
        colour = self._rng.integers(0, 256, size=3).astype(np.float32)
        ramp = np.linspace(0.5, 1.0, self.width, dtype=np.float32)[None, :, None]
        noise = self._rng.normal(0, 12, size=(self.height, self.width, 3))
        image = np.clip(colour * ramp + noise, 0, 255).astype(np.uint8)
        frame = Frame(image, self._index, time.monotonic())
        self._index += 1
        return frame
