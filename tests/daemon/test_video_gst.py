"""Video outputs through real GStreamer pipelines: an RTSP server read by a client, RTP to a
local receiver, an H.264 file decoded back, a taken port and a missing display retried. Run by
`make test-gst` (Debian's python3-opencv, python3-gi, gst-rtsp-server); skipped elsewhere
unless SURGEON_REQUIRE_GSTREAMER=1."""

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from daemon.outputs import FrameInfo, VideoOutputs, make_sink, parse_output_uri
from daemon.outputs.base import OutputUnavailable, gi_rtsp_server
from daemon.sources.opencv import gstreamer_available

from .ports import free_port

REQUIRED = os.environ.get("SURGEON_REQUIRE_GSTREAMER") == "1"
if not gstreamer_available() or gi_rtsp_server() is not None:
    if REQUIRED:
        raise RuntimeError("SURGEON_REQUIRE_GSTREAMER=1 but OpenCV has no GStreamer or the "
                           "RTSP server does not import")
    pytestmark = pytest.mark.skip(reason="needs OpenCV with GStreamer and gst-rtsp-server")

cv2 = pytest.importorskip("cv2")
INFO = FrameInfo({"class": 3, "name": "cat", "confidence": 0.8},
                 {"class": 5, "name": "dog", "confidence": 0.4})


class Feeder:
    """Offers grey frames to ``outputs`` at ``fps`` from a thread, like serving does."""

    def __init__(self, outputs, fps=20, shape=(120, 160, 3)):
        self.outputs, self.period, self.shape = outputs, 1.0 / fps, shape
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.outputs.offer(np.full(self.shape, 200, np.uint8), INFO)
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.outputs.stop()


def _read(pipeline, count, timeout=20.0):
    capture = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    frames, deadline = [], time.monotonic() + timeout
    while capture.isOpened() and len(frames) < count and time.monotonic() < deadline:
        ok, image = capture.read()
        if ok:
            frames.append(image)
    capture.release()
    return frames


def _outputs(uri, **kwargs):
    return VideoOutputs([make_sink(parse_output_uri(uri))], fps=20, min_height=240,
                        backoff_initial_s=0.1, backoff_max_s=0.2, **kwargs)


def _overlaid(image):
    """The banner is dark over the grey frame, and the border is the disagreement colour."""
    return image[2:30].mean() < 150 < image[120:].mean() and image[-1, 100, 2] > 150


def _wait_open(outputs):
    deadline = time.monotonic() + 10       # a server starts with its first frame
    while outputs.stats()["sinks"][0]["state"] != "open" and time.monotonic() < deadline:
        time.sleep(0.02)


def test_an_rtsp_output_is_read_by_a_client():
    port = free_port()
    outputs = _outputs("rtsp://127.0.0.1:%d/live" % port).start()
    with Feeder(outputs):
        _wait_open(outputs)
        frames = _read("rtspsrc location=rtsp://127.0.0.1:%d/live latency=0 ! decodebin ! "
                       "videoconvert ! video/x-raw,format=BGR ! appsink" % port, 15)
        sink = outputs.stats()["sinks"][0]
    assert len(frames) == 15 and frames[0].shape == (240, 320, 3)
    assert sink["state"] == "open" and "264" in sink["detail"]
    assert _overlaid(frames[-1])


def test_a_taken_rtsp_port_is_reported_and_retried_never_fatal():
    port = free_port()
    first = _outputs("rtsp://127.0.0.1:%d/live" % port).start()
    second = _outputs("rtsp://127.0.0.1:%d/live" % port).start()
    with Feeder(first):
        _wait_open(first)
        with Feeder(second):
            time.sleep(1.5)
            sink = second.stats()["sinks"][0]
        assert sink["state"] == "failed" and sink["failures"] >= 3
        assert "port" in sink["last_error"]
        assert first.stats()["sinks"][0]["state"] == "open"


def test_rtp_reaches_a_local_receiver():
    port = free_port()
    received = []
    receiver = threading.Thread(target=lambda: received.extend(_read(
        "udpsrc port=%d caps=\"application/x-rtp,media=video,encoding-name=H264,payload=96,"
        "clock-rate=90000\" ! rtph264depay ! decodebin ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink" % port, 10)))
    receiver.start()
    time.sleep(0.5)
    with Feeder(_outputs("rtp://127.0.0.1:%d" % port).start()):
        receiver.join(25)
    assert len(received) == 10 and received[0].shape == (240, 320, 3)
    assert _overlaid(received[-1])


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_an_h264_file_decodes_back(tmp_path, suffix):
    path = tmp_path / ("out" + suffix)
    outputs = _outputs("file://%s" % path).start()
    for index in range(30):
        outputs.offer(np.full((120, 160, 3), 200, np.uint8), INFO)
        deadline = time.monotonic() + 5
        while outputs._slot is not None and time.monotonic() < deadline:
            time.sleep(0.005)
    detail = outputs.stats()["sinks"][0]["detail"]
    outputs.stop()
    frames = _read("filesrc location=%s ! decodebin ! videoconvert ! video/x-raw,format=BGR ! "
                   "appsink" % path, 100, timeout=10)
    assert "264" in detail and len(frames) == 30 and _overlaid(frames[-1])


@pytest.fixture
def x_server(monkeypatch):
    """A virtual X server (Xvfb) as the display; its number from -displayfd."""
    if shutil.which("Xvfb") is None:
        if REQUIRED:
            raise RuntimeError("SURGEON_REQUIRE_GSTREAMER=1 but Xvfb is missing (apt xvfb)")
        pytest.skip("Xvfb is not installed")
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "640x480x24",
                               "-nolisten", "tcp"], pass_fds=(write,),
                              stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = int(pipe.readline())
    monkeypatch.setenv("DISPLAY", ":%d" % number)
    yield number
    server.terminate()
    server.wait(10)


def test_a_display_output_shows_the_overlaid_stream(x_server):
    outputs = _outputs("display://%d" % x_server).start()
    with Feeder(outputs):
        _wait_open(outputs)
        time.sleep(1.0)
        screen = _read("ximagesrc display-name=:%d use-damage=false num-buffers=1 ! "
                       "videoconvert ! video/x-raw,format=BGR ! appsink" % x_server, 1)
        sink = outputs.stats()["sinks"][0]
    assert sink["state"] == "open" and "imagesink" in sink["detail"] and sink["frames"] > 5
    orange = np.abs(screen[0].astype(int) - (0, 140, 255)).sum(2) < 40
    assert orange.sum() > 500          # the disagreement border and text are on the screen


def test_no_display_is_reported_and_retried(monkeypatch):
    if os.path.exists("/tmp/.X11-unix/X0"):
        pytest.skip("an X server runs here")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    sink = make_sink(parse_output_uri("display://0"))
    assert sink.missing(sink.spec) is None
    with pytest.raises(OutputUnavailable, match="no display"):
        sink.open(320, 240, 20)
    outputs = _outputs("display://0").start()
    with Feeder(outputs):
        time.sleep(0.6)
        state = outputs.stats()["sinks"][0]
    assert state["state"] == "failed" and state["failures"] >= 2
