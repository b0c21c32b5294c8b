"""dir://frames/?fps=F&loop=1&max_mb=M: the image files of a directory in name order.

Only regular files are decoded (a FIFO named ``x.jpg`` would block the reader forever), files
over ``max_mb`` and images over OPENCV_IO_MAX_IMAGE_PIXELS (set here to 8192 x 8192 unless the
environment says otherwise) are skipped and counted. The position lives in a cursor the factory
shares between rebuilds: when a decode outlasts the grabber's read timeout and the source is
rebuilt, it resumes after the file that stalled instead of looping on the first frames.
"""

import os
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional

from .base import CaptureError, EndOfStream, Frame, FrameSource
from .params import QueryParams

__all__ = ["DirectorySource", "DirectoryCursor", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(8192 * 8192))


class DirectoryCursor:
    """Where the stream is: the next file to read and the frames emitted so far."""

    def __init__(self):
        self.next = 0
        self.index = 0


class DirectorySource(FrameSource):
    live = False

    def __init__(self, uri: str, folder: str, params: Dict[str, str],
                 cursor: Optional[DirectoryCursor] = None):
        super().__init__(uri)
        self.folder = Path(folder)
        query = QueryParams("dir", params, ("fps", "loop", "max_mb"))
        self.fps = query.fps()
        self.loop = query.flag("loop")
        self.max_bytes = query.integer("max_mb", 64, 1, 4096) * (1 << 20)
        self.cursor = cursor if cursor is not None else DirectoryCursor()
        self._files: List[Path] = []
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

    def _decodable(self, path: Path) -> bool:
        """A regular file (links followed) of at most max_mb; never opens anything else."""
        try:
            info = os.stat(str(path))
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size <= self.max_bytes

    def read(self) -> Frame:
        import cv2

        cursor = self.cursor
        for _ in range(len(self._files)):
            if cursor.next >= len(self._files):
                if not self.loop:
                    raise EndOfStream(self.uri)
                cursor.next = 0
            path = self._files[cursor.next]
            cursor.next += 1      # before decoding: a decode that stalls is not retried
            image = cv2.imread(str(path), cv2.IMREAD_COLOR) if self._decodable(path) else None
            if image is None:   # truncated, foreign, special or oversized: skip it, count it
                self.skipped += 1
                continue
            if self.fps > 0:
                self._next_due += 1.0 / self.fps
                time.sleep(max(0.0, self._next_due - time.monotonic()))
            frame = Frame(image, cursor.index, time.monotonic())
            cursor.index += 1
            return frame
        raise CaptureError("dir source: no decodable image in %s" % self.folder)
