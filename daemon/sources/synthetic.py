"""synthetic://?width=W&height=H&fps=F&frames=N&seed=S: generated frames, no device needed."""

import time
from typing import Dict, Optional

import numpy as np

from .base import EndOfStream, Frame, FrameSource

__all__ = ["SyntheticSource"]


class SyntheticSource(FrameSource):
    """Smooth random colour fields plus noise at a fixed rate (0 = as fast as read)."""

    live = False

    def __init__(self, uri: str, params: Dict[str, str]):
        super().__init__(uri)
        self.width = int(params.get("width", 64))
        self.height = int(params.get("height", 64))
        self.fps = float(params.get("fps", 0))
        self.frames: Optional[int] = int(params["frames"]) if "frames" in params else None
        self.seed = int(params.get("seed", 0))
        if self.width < 1 or self.height < 1 or self.fps < 0:
            raise ValueError("synthetic:// needs width, height >= 1 and fps >= 0")
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
