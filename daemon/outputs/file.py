"""file:///path/out.mp4: an encoded recording of the overlaid stream.

H.264 through GStreamer when OpenCV has it (Jetson's hardware encoder first), else OpenCV's
own FFmpeg writer (MPEG-4 part 2 in pip's wheels, which carry no H.264 encoder). A recording
is never overwritten: an existing file moves to ``out.1.mp4`` (older ones up the numbers,
``keep`` of them), and a recording that reaches ``rotate_mb`` is closed and a new one starts,
so months of video keep a bounded disk. mp4 needs a clean close to be playable; .mkv plays
up to the last frame written even after a kill -9.
"""

from pathlib import Path
from typing import Optional

import numpy as np

from ..safefiles import shift_numbered
from ..sources.opencv import gstreamer_available
from .base import OutputUnavailable, VideoSink, h264_encoders, open_gst_writer
from .uri import OutputSpec

__all__ = ["FileSink"]

_MUXERS = {".mp4": "mp4mux", ".mkv": "matroskamux", ".avi": "avimux"}
_FOURCCS = ("mp4v", "MJPG")
_SIZE_CHECK_FRAMES = 100


class FileSink(VideoSink):
    def __init__(self, spec: OutputSpec, rotate_mb: Optional[float] = None, keep: int = 5):
        super().__init__(spec)
        self.path = Path(spec.path)
        self.max_bytes = None if rotate_mb is None else int(rotate_mb * 2**20)
        self.keep = keep
        self._writer = None
        self._frames = 0
        self._size = (0, 0, 0.0)

    @classmethod
    def missing(cls, spec: OutputSpec) -> Optional[str]:
        try:
            import cv2  # noqa: F401
        except ImportError as exc:
            return "file:// needs OpenCV (pip install opencv-python-headless; JetPack's " \
                "on Jetson): %s" % exc
        return None

    def open(self, width: int, height: int, fps: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():      # out.mp4 -> out.1.mp4 -> ... (the oldest dropped)
                shift_numbered(self.path, self.keep, lambda i: self.path.with_name(
                    "%s.%d%s" % (self.path.stem, i, self.path.suffix)))
        except OSError as exc:
            raise OutputUnavailable("%s: %s" % (self.path, exc.strerror or exc)) from None
        self._size = (width, height, fps)
        if gstreamer_available():
            muxer = _MUXERS[self.path.suffix.lower()]
            tails = ["%s ! %s ! filesink location=%s" % (encoder, muxer, self.path)
                     for encoder in h264_encoders()]
            self._writer, self.detail = open_gst_writer(tails, width, height, fps, live=False)
        else:
            self._writer, self.detail = self._open_ffmpeg(width, height, fps)
        self._frames = 0

    def _open_ffmpeg(self, width: int, height: int, fps: float):
        import cv2

        for fourcc in _FOURCCS:
            writer = cv2.VideoWriter(str(self.path), cv2.CAP_FFMPEG,
                                     cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
            if writer.isOpened():
                return writer, "OpenCV FFmpeg writer, %s" % fourcc
            writer.release()
        raise OutputUnavailable("OpenCV cannot write %s (tried %s)" % (self.path,
                                                                       ", ".join(_FOURCCS)))

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            raise OutputUnavailable("%s is not open" % self.path)
        self._writer.write(image)
        self._frames += 1
        if self.max_bytes is not None and self._frames % _SIZE_CHECK_FRAMES == 0:
            self._rotate_if_large()

    def _rotate_if_large(self) -> None:
        try:
            large = self.path.stat().st_size >= self.max_bytes
        except OSError as exc:
            raise OutputUnavailable("%s: %s" % (self.path, exc.strerror or exc)) from None
        if large:
            self.close()
            self.open(*self._size)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()
