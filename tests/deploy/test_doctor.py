import json
import subprocess
import sys

import time

import pytest

from daemon.doctor import (FAIL, OK, WARN, check_directory, check_opencv, check_platform,
                           check_torch, l4t_release)

RELEASE = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
           "DATE: Tue Aug  1 19:57:35 UTC 2023\n")


@pytest.fixture
def jetson_root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(RELEASE)
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_text(
        "NVIDIA Jetson Xavier NX Developer Kit\0")
    return tmp_path


def test_l4t_release_and_board(jetson_root, tmp_path_factory):
    assert l4t_release(jetson_root) == "R35.4.1"
    assert l4t_release(tmp_path_factory.mktemp("x86")) is None
    finding = check_platform(jetson_root)
    assert "Xavier NX" in finding.detail and "R35.4.1" in finding.detail
    expected = OK if sys.version_info[:2] == (3, 8) else WARN   # JetPack 5 wheels are cp38
    assert finding.status == expected


def test_on_jetson_a_torch_without_cuda_is_a_failure_with_a_fix(jetson_root):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    finding = check_torch(jetson_root)
    assert finding.status == FAIL and "JetPack wheel" in finding.fix


def test_on_jetson_an_opencv_without_gstreamer_is_a_failure(jetson_root):
    from daemon.sources.opencv import gstreamer_available

    pytest.importorskip("cv2")
    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer")
    finding = check_opencv(jetson_root)
    assert finding.status == FAIL and "pip uninstall opencv-python" in finding.fix


def test_directories_more_open_than_allowed_are_flagged(tmp_path):
    open_dir = tmp_path / "run"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    finding = check_directory("runtime dir", open_dir, 0o700)
    assert finding.status == WARN and "chmod 700" in finding.fix
    open_dir.chmod(0o700)
    assert check_directory("runtime dir", open_dir, 0o700).status == OK
    assert check_directory("runtime dir", tmp_path / "new" / "x", 0o700).status == OK


def _doctor(*args):
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "doctor", "--json"] + list(args),
                          capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_doctor_names_every_area_and_fails_on_a_model_that_cannot_load():
    code, findings = _doctor()
    checks = {f["check"] for f in findings}
    assert {"platform", "torch", "opencv", "zmq", "meminfo", "allocator", "jtop", "nvml",
            "runtime dir", "checkpoint dir", "devices", "model", "source", "video outputs",
            "daemon"} <= checks
    video = [f for f in findings if f["check"] == "video outputs"][0]
    assert video["status"] == "ok" and "file://" in video["detail"]
    assert code == (1 if any(f["status"] == FAIL for f in findings) else 0)
    code, findings = _doctor("--set", "model.weights=/nonexistent/r20.th")
    model = [f for f in findings if f["check"] == "model"][0]
    assert code == 1 and model["status"] == FAIL and "/nonexistent" in model["detail"]


def test_doctor_says_how_to_install_a_missing_allocator(tmp_path):
    from daemon.doctor import WARN, check_allocator

    missing = check_allocator("auto", dirs=(str(tmp_path),))
    assert missing.status == WARN and "libtcmalloc-minimal4" in missing.fix
    assert "libjemalloc2" in check_allocator("jemalloc", dirs=(str(tmp_path),)).fix
    assert check_allocator("glibc").status == "ok"


@pytest.mark.parametrize("path, origin", [
    ("/usr/lib/python3.8/dist-packages/cv2/python-3.8/cv2.cpython-38-aarch64-linux-gnu.so",
     "NVIDIA's JetPack build"),
    ("/usr/lib/python3/dist-packages/cv2.cpython-38-aarch64-linux-gnu.so",
     "Ubuntu's python3-opencv"),
    ("/opt/surgeon/venv/lib/python3.8/site-packages/cv2/__init__.py", "a pip wheel"),
])
def test_doctor_tells_nvidias_opencv_from_ubuntus_and_pips(path, origin):
    from daemon.doctor import opencv_origin

    assert opencv_origin(path) == origin


def test_doctor_opens_the_configured_source_for_one_frame(monkeypatch):
    from daemon.config import load_config
    from daemon.doctor import check_source
    from daemon.sources import synthetic

    def config(uri):
        return load_config(None, ["source.uri=" + uri, "source.backend=opencv"], environ={})

    good = check_source(config("synthetic://?width=40&height=30"))
    assert good.status == OK and "40 x 30" in good.detail
    missing = check_source(config("v4l2:///dev/video97"))
    assert missing.status == FAIL and "is the camera plugged in" in missing.detail
    monkeypatch.setattr(synthetic.SyntheticSource, "read", lambda self: time.sleep(30))
    hung = check_source(config("synthetic://"), timeout_s=0.5)
    assert hung.status == FAIL and "no frame within" in hung.detail


def test_doctor_fails_an_output_this_machine_cannot_run():
    from daemon.config import load_config
    from daemon.doctor import check_video_outputs
    from daemon.outputs.base import gi_rtsp_server

    finding = check_video_outputs(load_config(None, ["output.video=[rtsp://@:8554/live]"],
                                              environ={}))
    if gi_rtsp_server() is None:
        assert finding.status == "ok"
    else:
        assert finding.status == FAIL and "gir1.2-gst-rtsp-server-1.0" in finding.detail
