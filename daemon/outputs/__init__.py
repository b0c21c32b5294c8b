"""Video outputs, chosen by URI: the mirror of daemon/sources (display://, file://, rtsp://,
rtp://), fed from their own thread with the overlay drawn on every frame."""

from typing import List, Optional

from .base import OutputUnavailable, VideoSink
from .hub import VideoOutputs
from .overlay import FrameInfo
from .uri import BadOutputUri, OutputSpec, parse_output_uri

__all__ = ["VideoOutputs", "FrameInfo", "OutputSpec", "OutputUnavailable", "BadOutputUri",
           "VideoSink", "parse_output_uri", "make_sink", "missing_requirements"]


def _sink_class(kind: str):
    if kind == "display":
        from .display import DisplaySink
        return DisplaySink
    if kind == "file":
        from .file import FileSink
        return FileSink
    if kind == "rtsp":
        from .rtsp import RtspSink
        return RtspSink
    from .rtp import RtpSink
    return RtpSink


def make_sink(spec: OutputSpec, rotate_mb: Optional[float] = None, keep: int = 5) -> VideoSink:
    if spec.kind == "file":
        return _sink_class("file")(spec, rotate_mb, keep)
    return _sink_class(spec.kind)(spec)


def missing_requirements(specs: List[OutputSpec]) -> List[str]:
    """Every output this machine can never run, each with the fix."""
    found = []
    for spec in specs:
        problem = _sink_class(spec.kind).missing(spec)
        if problem:
            found.append("%s: %s" % (spec.uri, problem))
    return found
