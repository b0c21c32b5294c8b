"""Cameras, streams and video files through cv2.VideoCapture (GStreamer when OpenCV has it).

OpenCV is imported on first use: on Jetson it must be the system build (with GStreamer), never
PyPI's wheel, and the daemon must start without it when no camera source is configured.
"""

import errno
import logging
import os
import stat
import time
from typing import Optional

import numpy as np

from .base import CaptureError, EndOfStream, Frame, FrameSource

log = logging.getLogger("surgeond.source")

__all__ = ["OpenCVSource", "FileSource", "gstreamer_available", "build_option",
           "opencv_import_error",
           "import_opencv_first"]

_TLS_FIX = ("cannot allocate memory in static TLS block: on Jetson, OpenCV (and NVIDIA's "
            "GStreamer plugins) must load before torch. surgeond imports cv2 first; in your own "
            "code import cv2 before torch, or start with LD_PRELOAD=/usr/lib/aarch64-linux-gnu/"
            "libgomp.so.1")
_import_error = []


def device_problem(path: str) -> Optional[str]:
    """Why the camera device at ``path`` cannot be used, with the fix; None when it opens.
    A missing device, a permission problem and a busy one each get their own words."""
    if not os.path.exists(path):
        return "no such device %s: is the camera plugged in? (ls /dev/video*)" % path
    if not stat.S_ISCHR(os.stat(path).st_mode):
        return "%s is not a camera device" % path
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    except PermissionError:
        return ("permission denied on %s: add the service user to group video (sudo usermod "
                "-aG video USER; L4T makes /dev/video* root:video 0660)" % path)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "%s is busy: another process holds it (sudo fuser -v %s)" % (path, path)
        return "%s: %s" % (path, exc.strerror or exc)
    return None


def opencv_import_error() -> Optional[str]:
    """Why ``import cv2`` failed, with the fix for the static-TLS failure; None if it works
    or was never tried."""
    return _import_error[0] if _import_error else None


def import_opencv_first() -> None:
    """Import cv2 before torch exists in the process (the Jetson static-TLS rule); a failure
    is remembered for the messages, never raised."""
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        text = str(exc)
        _import_error[:] = [_TLS_FIX + " (%s)" % text if "static TLS" in text else text]


def build_option(name: str) -> Optional[str]:
    """The value OpenCV's build information gives ``name`` (``GStreamer``, ``GUI``), None when
    it names none or cv2 does not import."""
    try:
        import cv2
    except ImportError as exc:
        if not _import_error:
            import_opencv_first()
        log.debug("cv2 does not import: %s", exc)
        return None
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def gstreamer_available() -> bool:
    """True when this OpenCV was built with GStreamer ("GStreamer: YES" in its build info)."""
    return "YES" in (build_option("GStreamer") or "")


class OpenCVSource(FrameSource):
    """One VideoCapture: a GStreamer pipeline string, a device path or a URL/file.

    Args:
        uri: what the user configured (for messages).
        target: the pipeline, device or URL handed to VideoCapture.
        api: ``gstreamer``, ``v4l2``, ``ffmpeg`` or ``any``.
        live: camera or network stream (drops stale frames) rather than a file.
    """

    def __init__(self, uri: str, target: str, api: str, live: bool = True,
                 width: Optional[int] = None, height: Optional[int] = None,
                 device: Optional[str] = None):
        super().__init__(uri)
        self.target, self.api, self.live = target, api, live
        self.device = device          # the /dev/videoN behind a v4l2:// source
        self.width, self.height = width, height
        self._cap = None
        self._index = 0

    def open(self) -> None:
        import cv2

        problem = device_problem(self.device) if self.device else None
        if problem is not None:
            raise CaptureError(problem)
        apis = {"gstreamer": cv2.CAP_GSTREAMER, "v4l2": cv2.CAP_V4L2,
                "ffmpeg": cv2.CAP_FFMPEG, "any": cv2.CAP_ANY}
        cap = cv2.VideoCapture(self.target, apis[self.api])
        if not cap.isOpened():
            cap.release()
            hint = ("; if another process streams from it: sudo fuser -v %s" % self.device
                    if self.device else "")
            raise CaptureError("cannot open %s (%s backend)%s" % (self.uri, self.api, hint))
        if self.api == "v4l2" and self.width and self.height:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        self._cap = cap

    def read(self) -> Frame:
        if self._cap is None:
            raise CaptureError("%s is not open" % self.uri)
        ok, image = self._cap.read()
        if not ok or image is None:
            if not self.live:
                raise EndOfStream(self.uri)
            raise CaptureError("%s: read failed (stream ended or device lost)" % self.uri)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.shape[2] == 4:
            image = np.ascontiguousarray(image[:, :, :3])
        frame = Frame(image, self._index, time.monotonic())
        self._index += 1
        return frame

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def describe(self) -> str:
        return "%s via %s" % (self.uri, self.api)


class FileSource(OpenCVSource):
    """A video file; with ``loop`` it reopens at the end instead of ending the stream."""

    def __init__(self, uri: str, target: str, api: str, loop: bool = False):
        super().__init__(uri, target, api, live=False)
        self.loop = loop

    def read(self) -> Frame:
        try:
            return super().read()
        except EndOfStream:
            if not self.loop:
                raise
            self.close()
            self.open()
            return super().read()
