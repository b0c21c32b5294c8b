"""Real GStreamer pipelines through OpenCV: run by `make test-gst` with Debian's python3-opencv
(built with GStreamer) and a local RTSP server. Elsewhere they skip, unless
SURGEON_REQUIRE_GSTREAMER=1 (the CI lane) turns a missing GStreamer into a failure."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import SourceConfig
from daemon.sources import Grabber, source_factory
from daemon.sources.opencv import gstreamer_available
from daemon.sources.pipelines import file_pipeline, rtsp_pipeline, v4l2_pipeline

REQUIRED = os.environ.get("SURGEON_REQUIRE_GSTREAMER") == "1"
SYSTEM_PYTHON = "/usr/bin/python3"

if not gstreamer_available():
    if REQUIRED:
        raise RuntimeError("SURGEON_REQUIRE_GSTREAMER=1 but this OpenCV has no GStreamer")
    pytestmark = pytest.mark.skip(reason="OpenCV without GStreamer (run `make test-gst`)")

cv2 = pytest.importorskip("cv2")
GST = SourceConfig(backend="gstreamer", read_timeout_s=2.0, reconnect_initial_s=0.2,
                   reconnect_max_s=1.0, rtsp_latency_ms=0)


def _frames(grabber, n, timeout=30.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        frame = grabber.get(0.2)
        if frame is not None:
            got.append(frame)
    return got


def test_a_gst_uri_pipeline_delivers_bgr_frames():
    uri = ("gst://videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! "
           "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    grabber = Grabber(source_factory(uri, GST)).start()
    frames = _frames(grabber, 10)
    grabber.stop()
    assert len(frames) == 10 and frames[0].image.shape == (48, 64, 3)


def test_a_video_file_through_decodebin(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(15):
        writer.write(np.full((48, 64, 3), 15 * i, np.uint8))
    writer.release()
    grabber = Grabber(source_factory("file://%s" % path, GST)).start()
    frames = _frames(grabber, 100, timeout=20)
    assert len(frames) == 15 and grabber.ended


def test_the_camera_pipeline_strings_parse():
    gi = pytest.importorskip("gi")
    gi.require_version("Gst", "1.0")
    from gi.repository import Gst

    Gst.init(None)
    for text in (v4l2_pipeline("/dev/video0", 640, 480, 30),
                 rtsp_pipeline("rtsp://127.0.0.1:1/x", 200, "auto"), file_pipeline("/x.mp4")):
        pipeline = Gst.parse_launch(text)
        assert isinstance(pipeline, Gst.Pipeline), text
        names = [pipeline.get_child_by_index(i).get_factory().get_name()
                 for i in range(pipeline.get_children_count())]
        assert "appsink" in names, (text, names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_rtsp(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([SYSTEM_PYTHON, str(Path(__file__).with_name("rtsp_server.py")),
                             str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(5)
    server.stdout.close()


@pytest.mark.skipif(not shutil.which(SYSTEM_PYTHON) and not REQUIRED, reason="no system python")
def test_rtsp_stream_that_dies_and_comes_back_is_reconnected():
    port = _free_port()
    server = _serve_rtsp(port)
    grabber = Grabber(source_factory("rtsp://127.0.0.1:%d/test" % port, GST),
                      read_timeout_s=2.0, backoff_initial_s=0.2, backoff_max_s=1.0).start()
    try:
        assert len(_frames(grabber, 10)) == 10
        _stop(server)
        deadline = time.monotonic() + 20
        while grabber.failures == 0 and time.monotonic() < deadline:
            grabber.get(0.1)
        assert grabber.failures >= 1, grabber.stats()
        server = _serve_rtsp(port)
        frames = _frames(grabber, 10, timeout=40)
        assert len(frames) == 10 and frames[-1].image.shape == (120, 160, 3)
        assert grabber.reconnects >= 1 and grabber.state == "streaming"
    finally:
        grabber.stop()
        _stop(server)
