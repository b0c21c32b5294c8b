"""Helpers for tests that read frames from a Grabber or wait on a condition (no torch: the
GStreamer lane uses it)."""

import time


def drain(grabber, limit=10_000, timeout=20.0):
    """Frames until ``limit``, ``timeout`` s or the end of the stream."""
    frames, deadline = [], time.monotonic() + timeout
    while len(frames) < limit and time.monotonic() < deadline and not grabber.ended:
        frame = grabber.get(0.1)
        if frame is not None:
            frames.append(frame)
    return frames


def wait_for(predicate, timeout=60.0):
    """Poll ``predicate`` until true; a fixed sleep instead flakes under load (OpenCV's
    GStreamer backend took over 0.3 s to fail an open in the gst lane)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
