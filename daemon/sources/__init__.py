"""Frame sources behind one interface, chosen by URI (see uri.py), and the grab thread."""

from .base import CaptureError, EndOfStream, Frame, FrameSource
from .grabber import Grabber, SourceState
from .uri import SCHEMES, UnknownSource, source_factory

__all__ = ["CaptureError", "EndOfStream", "Frame", "FrameSource", "Grabber", "SourceState",
           "SCHEMES", "UnknownSource", "source_factory"]
