"""rtp://HOST:PORT: H.264 in RTP over UDP to one receiver (a VLC or GStreamer on the LAN).

Receive it with: gst-launch-1.0 udpsrc port=PORT caps="application/x-rtp,media=video,
encoding-name=H264,payload=96,clock-rate=90000" ! rtph264depay ! decodebin ! autovideosink
"""

from typing import Optional

import numpy as np

from ..sources.opencv import gstreamer_available
from .base import OutputUnavailable, VideoSink, h264_encoders, open_gst_writer
from .uri import OutputSpec

__all__ = ["RtpSink"]


class RtpSink(VideoSink):
    def __init__(self, spec: OutputSpec):
        super().__init__(spec)
        self._writer = None

    @classmethod
    def missing(cls, spec: OutputSpec) -> Optional[str]:
        if gstreamer_available():
            return None
        return ("rtp:// needs OpenCV built with GStreamer (JetPack's, or Debian's "
                "python3-opencv); pip's wheels have none")

    def open(self, width: int, height: int, fps: float) -> None:
        tails = ["%s ! rtph264pay config-interval=1 pt=96 ! udpsink host=%s port=%d sync=false "
                 "async=false" % (encoder, self.spec.host, self.spec.port)
                 for encoder in h264_encoders()]
        self._writer, self.detail = open_gst_writer(tails, width, height, fps)

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            raise OutputUnavailable("%s is not open" % self.spec.uri)
        self._writer.write(image)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()
