"""Camera and stream pipelines (issue 16): CSI options, MJPEG webcams, H.265 RTSP, Jetson's
hardware decoders followed by nvvidconv. Strings are checked here; where this machine has the
elements, the decode chains really negotiate under gst-launch-1.0."""

import os
import shutil
import subprocess

import pytest

from daemon.config import SourceConfig
from daemon.sources import UnknownSource, source_factory
from daemon.sources import pipelines
from daemon.sources.pipelines import csi_pipeline, rtsp_pipeline, v4l2_pipeline

GST_LAUNCH = shutil.which("gst-launch-1.0")


@pytest.fixture
def jetson(monkeypatch):
    monkeypatch.setattr(pipelines, "on_jetson", lambda: True)


def test_csi_flip_sensor_mode_and_size():
    text = csi_pipeline(1, 1920, 1080, 30, flip=2, sensor_mode=3)
    assert "sensor-id=1 sensor-mode=3" in text and "flip-method=2" in text
    assert "width=1920,height=1080,framerate=30/1" in text
    assert "sensor-mode" not in csi_pipeline(0, 1280, 720, 30)


def test_mjpeg_webcams_get_a_jpeg_decoder(jetson):
    assert "image/jpeg,width=1280" in v4l2_pipeline("/dev/video0", 1280, 720, 30, "mjpeg")
    assert "nvv4l2decoder mjpeg=1 ! nvvidconv" in v4l2_pipeline("/dev/video0", 1280, 720, 30,
                                                                "mjpeg")


def test_rtsp_h265_and_a_pinned_hardware_decoder_on_jetson(jetson):
    text = rtsp_pipeline("rtsp://cam/x", 200, "auto", "h265")
    assert "rtph265depay ! h265parse ! nvv4l2decoder enable-max-performance=1 ! nvvidconv" \
        in text
    pinned = rtsp_pipeline("rtsp://cam/x", 200, "nvv4l2decoder", "h264")
    assert "rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx" \
        in pinned


def test_off_jetson_decodebin_finds_the_codec():
    assert "! decodebin !" in rtsp_pipeline("rtsp://cam/x", 200, "auto", "h265")
    assert "jpegdec" in v4l2_pipeline("/dev/video0", 640, 480, 30, "mjpeg")


@pytest.mark.parametrize("uri", ["csi://0?flip=9", "csi://0?mode=1", "v4l2:///dev/video0?format=h264",
                                 "v4l2:///dev/video0?width=0"])
def test_bad_camera_options_are_config_errors(uri):
    with pytest.raises(UnknownSource):
        source_factory(uri, SourceConfig(backend="opencv"))


def _launch(text):
    out = subprocess.run([GST_LAUNCH, "-q"] + text.split(), capture_output=True, text=True,
                         timeout=60)
    return out.returncode, out.stderr[-2000:]


needs_gst = pytest.mark.skipif(GST_LAUNCH is None and os.environ.get(
    "SURGEON_REQUIRE_GSTREAMER") != "1", reason="no gst-launch-1.0 here (make gst-debs)")
TEST_SOURCE = "videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48,framerate=30/1"


@needs_gst
def test_the_mjpeg_chain_negotiates():
    text = v4l2_pipeline("/dev/video0", 64, 48, 30, "mjpeg")
    text = text.replace("v4l2src device=/dev/video0 do-timestamp=true",
                        TEST_SOURCE + " ! jpegenc")
    code, err = _launch(text.replace(pipelines.APPSINK, "fakesink"))
    assert code == 0, err


@needs_gst
def test_the_h265_rtp_chain_negotiates():
    text = rtsp_pipeline("rtsp://cam/x", 0, "avdec_h265", "h265")
    source = "rtspsrc location=rtsp://cam/x latency=0 drop-on-latency=true"
    text = text.replace(source, TEST_SOURCE + " ! x265enc ! rtph265pay")
    code, err = _launch(text.replace(pipelines.APPSINK, "fakesink"))
    assert code == 0, err


def test_surgeond_imports_opencv_before_torch():
    """On Jetson the other order fails with 'cannot allocate memory in static TLS block'."""
    import sys

    pytest.importorskip("torch")      # the GStreamer lane's system Python has none

    script = ("import sys\n"
              "from daemon.cli import main\n"
              "main(['config', '--set', 'source.uri=synthetic://'])\n"
              "names = list(sys.modules)\n"
              "print(names.index('cv2') < names.index('torch'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_a_static_tls_failure_is_reported_with_its_fix(monkeypatch):
    import builtins

    from daemon.sources import opencv, uri

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("libgomp.so.1: cannot allocate memory in static TLS block")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    monkeypatch.setattr(opencv, "_import_error", [])
    with pytest.raises(UnknownSource, match="static TLS.*import cv2 before torch.*LD_PRELOAD"):
        uri._use_gstreamer("gstreamer")


def test_camera_device_problems_are_told_apart(tmp_path, monkeypatch):
    import errno
    import os

    from daemon.sources.opencv import device_problem

    assert "is the camera plugged in" in device_problem(str(tmp_path / "video9"))
    (tmp_path / "file").write_bytes(b"")
    assert "not a camera device" in device_problem(str(tmp_path / "file"))
    null = "/dev/null"                               # a character device anyone may open
    assert device_problem(null) is None
    real_open = os.open

    def refused(code):
        def fake(path, *args, **kwargs):
            if path == null:
                raise (PermissionError if code == errno.EACCES else OSError)(code, "x")
            return real_open(path, *args, **kwargs)
        return fake

    monkeypatch.setattr(os, "open", refused(errno.EACCES))
    assert "group video" in device_problem(null)
    monkeypatch.setattr(os, "open", refused(errno.EBUSY))
    assert "busy" in device_problem(null) and "fuser -v /dev/null" in device_problem(null)


def test_a_v4l2_source_reports_a_missing_device_with_its_fix():
    from daemon.sources import Grabber

    grabber = Grabber(source_factory("v4l2:///dev/video97", SourceConfig(backend="opencv")),
                      backoff_initial_s=0.05).start()
    try:
        import time

        deadline = time.monotonic() + 10
        while not grabber.last_error and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        grabber.stop()
    assert "no such device /dev/video97: is the camera plugged in" in grabber.last_error
