"""Source URIs to source factories (DESIGN.md decision 6, after jetson-utils' URI scheme).

    csi://0?flip=2&sensor_mode=3  nvarguscamerasrc (Jetson CSI camera, GStreamer only)
    v4l2:///dev/video0?format=mjpeg  USB camera (GStreamer v4l2src, else OpenCV's V4L2)
                                  (both take width, height and fps too)
    rtsp://host:8554/stream       network stream (rtspsrc, else OpenCV's FFmpeg)
    file://clip.mp4               video file (decodebin, else OpenCV's own); ?loop=1 repeats
    dir://frames/                 image files in name order; ?fps=10&loop=1
    gst://<pipeline> ! appsink    any GStreamer pipeline ending in an appsink
    replay://cifar10?schedule=clean:600,fog:1500&severity=5&fps=30
    synthetic://?width=64&height=64&fps=30&frames=1000

A factory builds a fresh, unopened source each call: reconnecting means rebuilding.
"""

from pathlib import Path
from typing import Callable, Dict
from urllib.parse import parse_qsl, urlsplit

from .base import FrameSource
from .directory import DirectorySource
from .params import QueryParams
from .opencv import FileSource, OpenCVSource, gstreamer_available, opencv_import_error
from .pipelines import csi_pipeline, file_pipeline, rtsp_pipeline, v4l2_pipeline
from .replay import ReplaySource
from .synthetic import SyntheticSource

__all__ = ["source_factory", "SCHEMES", "UnknownSource"]

SCHEMES = ("csi", "v4l2", "rtsp", "rtsps", "file", "dir", "gst", "replay", "synthetic")

SourceFactory = Callable[[], FrameSource]


class UnknownSource(ValueError):
    """The URI names no known scheme or is malformed."""


def _use_gstreamer(backend: str) -> bool:
    if backend == "opencv":
        return False
    has = gstreamer_available()
    if backend == "gstreamer" and not has:
        why = opencv_import_error()
        if why is not None:
            raise UnknownSource("source.backend is gstreamer but OpenCV does not import: %s"
                                % why)
        raise UnknownSource("source.backend is gstreamer but this OpenCV was built without it "
                            "(on Jetson use the system OpenCV, not PyPI's opencv-python)")
    return has


def source_factory(uri: str, settings) -> SourceFactory:
    """A factory for ``uri``; ``settings`` is a SourceConfig. Checks the URI and its
    parameters now (UnknownSource names the problem), opens later."""
    try:
        return _factory(uri, settings)
    except UnknownSource:
        raise
    except ValueError as exc:
        raise UnknownSource("source %r: %s" % (uri, exc)) from None


def _query(query: str) -> Dict[str, str]:
    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        raise UnknownSource("a parameter appears twice in %r" % query)
    return params


def _factory(uri: str, settings) -> SourceFactory:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise UnknownSource("source %r: expected one of %s%s"
                            % (uri, ", ".join(s + "://" for s in SCHEMES), _did_you_mean(uri)))
    if scheme == "gst":
        if "appsink" not in rest:
            raise UnknownSource("gst:// pipeline must end in an appsink: %r" % rest)
        _use_gstreamer("gstreamer")
        return lambda: OpenCVSource(uri, rest, "gstreamer", live=True)
    parts = urlsplit(uri)
    params = (_query(parts.query) if scheme in ("synthetic", "replay", "dir", "file", "csi",
                                                 "v4l2") else {})
    location = parts.netloc + parts.path
    if scheme == "synthetic":
        SyntheticSource(uri, params)   # validate now
        return lambda: SyntheticSource(uri, params)
    if scheme == "replay":
        first = ReplaySource(uri, parts.netloc, params)   # loads the data: fail at start-up
        made = [first]
        return lambda: made.pop() if made else ReplaySource(uri, parts.netloc, params)
    if scheme == "dir":
        cursor = DirectorySource(uri, location, params).cursor   # parameters checked now
        return lambda: DirectorySource(uri, location, params, cursor)
    if not location:
        raise UnknownSource("source %r names no device, address or file" % uri)
    return _camera_factory(scheme, uri, location, params, settings)


def _did_you_mean(uri: str) -> str:
    """A bare path, as people type it: suggest the URI it stands for."""
    path = Path(uri)
    if uri.startswith("/dev/video"):
        return "; did you mean v4l2://%s ?" % uri
    if path.is_dir():
        return "; did you mean dir://%s ?" % path.resolve()
    if path.is_file() or path.suffix.lower() in (".mp4", ".mkv", ".avi", ".mov", ".h264",
                                                 ".h265", ".ts", ".webm"):
        return "; did you mean file://%s ?" % path.resolve()
    return ""


def _device_factory(scheme, uri, location, params, settings, gst) -> SourceFactory:
    """csi://N?flip=2&sensor_mode=3 and v4l2:///dev/videoN?format=mjpeg; width, height and
    fps in the URI override the source settings."""
    keys = ("width", "height", "fps") + (("flip", "sensor_mode") if scheme == "csi"
                                         else ("format",))
    query = QueryParams(scheme, params, keys)
    w = query.integer("width", settings.width, 16, 8192)
    h = query.integer("height", settings.height, 16, 8192)
    fps = query.integer("fps", settings.fps, 1, 240)
    if scheme == "csi":
        if not location.isdigit():
            raise UnknownSource("csi:// takes a sensor number, e.g. csi://0, got %r" % uri)
        if not gst:
            raise UnknownSource("csi:// needs OpenCV with GStreamer (the Jetson system build)")
        text = csi_pipeline(int(location), w, h, fps, query.integer("flip", 0, 0, 7),
                            query.integer("sensor_mode", None, 0, 64))
        return lambda: OpenCVSource(uri, text, "gstreamer")
    fmt = query.text("format", "raw")
    if fmt not in ("raw", "mjpeg"):
        raise UnknownSource("v4l2:// format=%r: choose raw or mjpeg" % fmt)
    if gst:
        text = v4l2_pipeline(location, w, h, fps, fmt, settings.decoder)
        return lambda: OpenCVSource(uri, text, "gstreamer", device=location)
    return lambda: OpenCVSource(uri, location, "v4l2", width=w, height=h, device=location)


def _camera_factory(scheme, uri, location, params, settings) -> SourceFactory:
    gst = _use_gstreamer(settings.backend)
    if scheme in ("csi", "v4l2"):
        return _device_factory(scheme, uri, location, params, settings, gst)
    if scheme in ("rtsp", "rtsps"):
        latency = settings.rtsp_latency_ms
        if gst:
            text = rtsp_pipeline(uri, latency, settings.decoder, settings.codec)
            return lambda: OpenCVSource(uri, text, "gstreamer")
        return lambda: OpenCVSource(uri, uri, "ffmpeg")
    # file://
    loop = QueryParams("file", params, ("loop",)).flag("loop")
    if not Path(location).is_file():
        raise UnknownSource("file://: %s %s" % (location, "is not a regular file"
                                                 if Path(location).exists() else "does not exist"))
    if gst:
        return lambda: FileSource(uri, file_pipeline(location), "gstreamer", loop)
    return lambda: FileSource(uri, location, "any", loop)

