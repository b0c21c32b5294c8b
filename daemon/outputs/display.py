"""display://N: a window with the overlaid stream.

Through GStreamer when OpenCV has it (on Jetson NVIDIA's nv3dsink, else the X sinks), else
OpenCV's own window (a GUI build of OpenCV; pip's headless wheel has none). With no display
the sink reports why and is retried, so a monitor plugged in later is picked up.
"""

from typing import Optional

import numpy as np

from ..sources.pipelines import on_jetson
from ..sources.opencv import build_option, gstreamer_available
from .base import OutputUnavailable, VideoSink, has_display, open_gst_writer
from .uri import OutputSpec

__all__ = ["DisplaySink"]

WINDOW = "surgeon"


class DisplaySink(VideoSink):
    def __init__(self, spec: OutputSpec):
        super().__init__(spec)
        self._writer = None
        self._window = False

    @classmethod
    def missing(cls, spec: OutputSpec) -> Optional[str]:
        try:
            import cv2  # noqa: F401
        except ImportError as exc:
            return "display:// needs OpenCV (%s)" % exc
        gui = build_option("GUI")
        if gstreamer_available() or (gui and "NONE" not in gui.upper()):
            return None
        return ("display:// needs OpenCV with GStreamer or a GUI backend; pip's "
                "opencv-python-headless has neither (on Jetson use JetPack's OpenCV)")

    def open(self, width: int, height: int, fps: float) -> None:
        problem = has_display(self.spec.display)
        if problem:
            raise OutputUnavailable(problem)
        if gstreamer_available():
            sinks = (["nvvidconv ! nv3dsink sync=false",
                      "nvvidconv ! nvegltransform ! nveglglessink sync=false"]
                     if on_jetson() else [])
            sinks += ["videoconvert ! xvimagesink sync=false",
                      "videoconvert ! ximagesink sync=false"]
            self._writer, self.detail = open_gst_writer(sinks, width, height, fps)
            return
        import cv2

        try:
            cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            raise OutputUnavailable("cannot open a window: %s" % exc) from None
        self._window, self.detail = True, "OpenCV window"

    def write(self, image: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.write(image)
            return
        import cv2

        cv2.imshow(WINDOW, image)
        cv2.waitKey(1)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()
        if self._window:
            import cv2

            self._window = False
            try:
                cv2.destroyWindow(WINDOW)
            except cv2.error:
                pass
