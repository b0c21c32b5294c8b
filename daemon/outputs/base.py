"""The interface every video sink implements, and the GStreamer pieces they share.

Sinks encode through ``cv2.VideoWriter`` on a GStreamer pipeline that starts at ``appsrc``
(JetPack's OpenCV has GStreamer), trying encoders in order: Jetson's hardware
``nvv4l2h264enc``, then ``x264enc`` and ``openh264enc`` in software. A pipeline that names a
missing element does not open, so the first one that opens is the one this machine has.
"""

import abc
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..sources.pipelines import on_jetson
from .uri import OutputSpec

__all__ = ["VideoSink", "OutputUnavailable", "h264_encoders", "open_gst_writer",
           "gi_rtsp_server", "has_display"]


class OutputUnavailable(Exception):
    """The sink cannot open or write now (no display, port taken, disk full); retried."""


class VideoSink(abc.ABC):
    """One output. ``open`` may raise OutputUnavailable; ``write`` takes BGR frames of the
    opened size; ``close`` is safe to call twice and after a failed open."""

    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.detail = ""            # what it opened (the pipeline), for status
        self.skipped = 0            # frames the sink itself let go (a client behind)

    @classmethod
    def missing(cls, spec: OutputSpec) -> Optional[str]:
        """Why this machine can never run the sink (a library it lacks), with the fix."""
        return None

    @abc.abstractmethod
    def open(self, width: int, height: int, fps: float) -> None:
        ...

    @abc.abstractmethod
    def write(self, image: np.ndarray) -> None:
        ...

    def close(self) -> None:
        ...


def gi_rtsp_server() -> Optional[str]:
    """None when GStreamer's RTSP server imports through PyGObject, else the reason."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GstRtspServer  # noqa: F401
    except (ImportError, ValueError) as exc:
        return str(exc)
    return None


def h264_encoders(bitrate_kbps: int = 4000) -> List[str]:
    """Elements from raw BGR to an H.264 byte stream, best first."""
    software = ["videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency "
                "speed-preset=ultrafast bitrate=%d key-int-max=30 ! h264parse" % bitrate_kbps,
                "videoconvert ! video/x-raw,format=I420 ! openh264enc bitrate=%d "
                "gop-size=30 ! h264parse" % (bitrate_kbps * 1000)]
    if not on_jetson():
        return software
    hardware = ("videoconvert ! video/x-raw,format=BGRx ! nvvidconv ! "
                "video/x-raw(memory:NVMM),format=NV12 ! nvv4l2h264enc insert-sps-pps=true "
                "bitrate=%d iframeinterval=30 ! h264parse" % (bitrate_kbps * 1000))
    return [hardware] + software


def open_gst_writer(tails: Sequence[str], width: int, height: int, fps: float,
                    live: bool = True) -> Tuple[object, str]:
    """The first ``appsrc ! TAIL`` that opens as a VideoWriter, and its pipeline. A file is
    not live: OpenCV's frame-count timestamps at ``fps`` stand."""
    import cv2

    tried = []
    source = "appsrc is-live=true do-timestamp=true format=time" if live else "appsrc"
    for tail in tails:
        pipeline = "%s ! %s" % (source, tail)
        writer = cv2.VideoWriter(pipeline, cv2.CAP_GSTREAMER, 0, float(fps), (width, height),
                                 True)
        if writer.isOpened():
            return writer, pipeline
        writer.release()
        tried.append(tail.split(" ! ")[-2] if " ! " in tail else tail)
    raise OutputUnavailable("no GStreamer pipeline opened (tried %s)" % "; ".join(tried))


def has_display(number: int) -> Optional[str]:
    """None when a window can open on display ``number``, else why not."""
    if os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY"):
        return None
    if os.path.exists("/tmp/.X11-unix/X%d" % number):
        return ("$DISPLAY is unset; X server :%d is running: start the daemon with DISPLAY=:%d "
                "(a systemd drop-in: Environment=DISPLAY=:%d)" % (number, number, number))
    return "no display: $DISPLAY is unset and there is no X server :%d" % number
