"""Helpers for tests that read frames from a Grabber (no torch: the GStreamer lane uses it)."""

import time


def drain(grabber, limit=10_000, timeout=20.0):
    """Frames until ``limit``, ``timeout`` s or the end of the stream."""
    frames, deadline = [], time.monotonic() + timeout
    while len(frames) < limit and time.monotonic() < deadline and not grabber.ended:
        frame = grabber.get(0.1)
        if frame is not None:
            frames.append(frame)
    return frames
