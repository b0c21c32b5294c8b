"""The one interface every frame source implements, and the frame it yields."""

import abc
from dataclasses import dataclass
from typing import Optional

import numpy as np

from surgeon_core.errors import CaptureError

__all__ = ["Frame", "FrameSource", "CaptureError", "EndOfStream"]


class EndOfStream(Exception):
    """A finite source (file, directory, replay) has no more frames."""


@dataclass
class Frame:
    """One captured image: HxWx3 uint8 in BGR order (OpenCV's), stamped at capture.

    ``label`` and ``domain`` exist only for labelled streams (replay); they go to telemetry,
    never to the learner.
    """

    image: np.ndarray
    index: int
    timestamp: float                 # time.monotonic() when captured
    label: Optional[int] = None
    domain: Optional[str] = None


class FrameSource(abc.ABC):
    """A device, stream or file. ``read`` blocks for the next frame.

    ``live`` sources (cameras, network streams) run at their own rate: the grabber keeps only
    the newest frame and counts the rest as drops. Other sources wait for the consumer, so every
    frame is served.
    """

    live = True
    labelled = False

    def __init__(self, uri: str):
        self.uri = uri

    @abc.abstractmethod
    def open(self) -> None:
        """Acquire the device; raises CaptureError when it cannot be opened."""

    @abc.abstractmethod
    def read(self) -> Frame:
        """The next frame; raises CaptureError on failure, EndOfStream at the end."""

    def close(self) -> None:
        """Release the device; safe to call twice and after a failed open."""

    def describe(self) -> str:
        return self.uri
