"""GStreamer pipeline strings for cameras and streams (research/jetson.md section 4.2).

Every pipeline ends in an appsink that drops stale buffers (``drop=true max-buffers=1
sync=false``): with OpenCV's default unbounded queue, latency and memory grow without limit.
GStreamer 1.16 on JetPack 5 has no ``leaky-type``, so ``drop``/``max-buffers`` it is.
"""

from pathlib import Path
from typing import Optional

__all__ = ["APPSINK", "on_jetson", "csi_pipeline", "v4l2_pipeline", "rtsp_pipeline",
           "file_pipeline", "h264_decoder", "decoder_for", "CODECS"]

APPSINK = "appsink drop=true max-buffers=1 sync=false"
TO_BGR = "videoconvert ! video/x-raw,format=BGR"
# V4L2 hardware decoders write NVMM buffers, which videoconvert cannot read: copy them out
FROM_NVMM = "nvvidconv ! video/x-raw,format=BGRx"
CODECS = ("h264", "h265", "mjpeg")
_SOFTWARE = {"h264": "avdec_h264", "h265": "avdec_h265", "mjpeg": "jpegdec"}
_DEPAY = {"h264": "rtph264depay ! h264parse", "h265": "rtph265depay ! h265parse"}


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def decoder_for(codec: str, choice: str = "auto") -> str:
    """Elements from ``codec`` to raw video in system memory: Jetson's V4L2 hardware decoder
    (``mjpeg=1`` for MJPEG) followed by nvvidconv, else the software decoder. An explicit
    ``choice`` is used as given, with nvvidconv added after an nvv4l2decoder that lacks it."""
    if codec not in CODECS:
        raise ValueError("codec %r: choose %s" % (codec, ", ".join(CODECS)))
    if choice != "auto":
        needs_copy = choice.startswith("nvv4l2decoder") and "nvvidconv" not in choice
        return "%s ! %s" % (choice, FROM_NVMM) if needs_copy else choice
    if on_jetson():
        options = "mjpeg=1" if codec == "mjpeg" else "enable-max-performance=1"
        return "nvv4l2decoder %s ! %s" % (options, FROM_NVMM)
    return _SOFTWARE[codec]


def h264_decoder(choice: str = "auto") -> str:
    """nvv4l2decoder on Jetson (pinned: decodebin may pick a software decoder), else decodebin."""
    if choice == "auto" and not on_jetson():
        return "decodebin"
    return decoder_for("h264", choice)


def csi_pipeline(sensor_id: int, width: int, height: int, fps: int, flip: int = 0,
                 sensor_mode: Optional[int] = None) -> str:
    """``flip``: nvvidconv's flip-method (0 none, 2 rotate 180, 4 horizontal, 6 vertical)."""
    mode = "" if sensor_mode is None else " sensor-mode=%d" % sensor_mode
    return ("nvarguscamerasrc sensor-id=%d%s ! video/x-raw(memory:NVMM),width=%d,height=%d,"
            "framerate=%d/1,format=NV12 ! nvvidconv flip-method=%d ! video/x-raw,format=BGRx ! "
            "%s ! %s" % (sensor_id, mode, width, height, fps, flip, TO_BGR, APPSINK))


def v4l2_pipeline(device: str, width: int, height: int, fps: int, fmt: str = "raw",
                  decoder: str = "auto") -> str:
    """``fmt`` raw asks the camera for uncompressed frames; mjpeg for JPEG ones, which many
    USB webcams offer at 720p and 1080p only (USB 2 cannot carry those raw at full rate)."""
    caps = "width=%d,height=%d,framerate=%d/1" % (width, height, fps)
    if fmt == "mjpeg":
        source = "image/jpeg,%s ! %s" % (caps, decoder_for("mjpeg", decoder))
    else:
        source = "video/x-raw,%s" % caps
    return "v4l2src device=%s do-timestamp=true ! %s ! %s ! %s" % (device, source, TO_BGR,
                                                                 APPSINK)


def rtsp_pipeline(url: str, latency_ms: int, decoder: str = "auto", codec: str = "h264") -> str:
    """Off Jetson, with the decoder on auto, decodebin finds the codec in the stream; a pinned
    decoder needs the depayloader and parser of ``codec`` (h264 or h265) in front of it."""
    if decoder == "auto" and not on_jetson():
        chain = "decodebin"
    else:
        if codec not in _DEPAY:
            raise ValueError("RTSP codec %r: choose h264 or h265" % codec)
        chain = "%s ! %s" % (_DEPAY[codec], decoder_for(codec, decoder))
    return ("rtspsrc location=%s latency=%d drop-on-latency=true ! %s ! %s ! %s"
            % (url, latency_ms, chain, TO_BGR, APPSINK))


def file_pipeline(path: str) -> str:
    # a file is not live: back-pressure instead of dropping, so every frame is served
    return "filesrc location=%s ! decodebin ! %s ! appsink sync=false max-buffers=4" % (
        path, TO_BGR)
