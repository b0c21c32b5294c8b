"""dir://frames/?fps=F&loop=1: the image files of a directory in name order."""

import time
from pathlib import Path
from typing import Dict, List

from .base import CaptureError, EndOfStream, Frame, FrameSource

__all__ = ["DirectorySource", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DirectorySource(FrameSource):
    live = False

    def __init__(self, uri: str, folder: str, params: Dict[str, str]):
        super().__init__(uri)
        self.folder = Path(folder)
        self.fps = float(params.get("fps", 0))
        self.loop = params.get("loop", "0") in ("1", "true", "yes")
        self._files: List[Path] = []
        self._next = 0
        self._index = 0
        self._next_due = 0.0
        self.skipped = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise CaptureError("dir source: %s is not a directory" % self.folder)
        self._files = sorted(p for p in self.folder.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise CaptureError("dir source: no image files in %s" % self.folder)
        self._next_due = time.monotonic()

    def read(self) -> Frame:
        import cv2

        for _ in range(len(self._files)):
            if self._next >= len(self._files):
                if not self.loop:
                    raise EndOfStream(self.uri)
                self._next = 0
            path = self._files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:   # a truncated or foreign file: skip it, count it
                self.skipped += 1
                continue
            if self.fps > 0:
                self._next_due += 1.0 / self.fps
                time.sleep(max(0.0, self._next_due - time.monotonic()))
            frame = Frame(image, self._index, time.monotonic())
            self._index += 1
            return frame
        raise CaptureError("dir source: no decodable image in %s" % self.folder)
