import threading
import time

import numpy as np
import pytest

from daemon.config import SourceConfig
from daemon.sources import (CaptureError, EndOfStream, Frame, FrameSource, Grabber, SourceState,
                            UnknownSource, source_factory)
from daemon.sources.replay import parse_schedule
from surgeon_core.errors import DataNotFound

from .grabbing import drain as _drain, wait_for

cv2 = pytest.importorskip("cv2")


def test_replay_is_deterministic_labelled_and_follows_its_schedule():
    uri = "replay://cifar10?schedule=clean:70,impulse_noise:80&severity=5&seed=3"
    a = _drain(Grabber(source_factory(uri, SourceConfig())).start())
    b = _drain(Grabber(source_factory(uri, SourceConfig())).start())
    assert len(a) == 150
    assert [f.domain for f in a] == ["clean"] * 70 + ["impulse_noise"] * 80
    assert all(np.array_equal(x.image, y.image) and x.label == y.label for x, y in zip(a, b))
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.uint8
    noisy = np.stack([f.image for f in a[70:]]).astype(float)
    clean = np.stack([f.image for f in a[:70]]).astype(float)
    assert (noisy == 0).mean() + (noisy == 255).mean() > 5 * ((clean == 0).mean()
                                                               + (clean == 255).mean())


def test_replay_schedule_and_data_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        parse_schedule("clean:10,rain:5")
    with pytest.raises(ValueError, match="name:frames"):
        parse_schedule("clean")
    monkeypatch.setenv("SURGEON_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFound, match="nowhere"):
        source_factory("replay://cifar10?schedule=clean:5", SourceConfig())


@pytest.mark.parametrize("uri", ["ftp://x", "camera0", "gst://videotestsrc", "csi://front",
                                 "file://", "synthetic://?width=0", "file:///nowhere/x.mp4"])
def test_bad_uris_are_refused_at_start(uri):
    with pytest.raises((UnknownSource, ValueError)):
        source_factory(uri, SourceConfig(backend="opencv"))


def test_synthetic_source_rate_and_count():
    grabber = Grabber(source_factory("synthetic://?width=40&height=30&frames=25",
                                     SourceConfig())).start()
    frames = _drain(grabber)
    assert len(frames) == 25 and frames[0].image.shape == (30, 40, 3)
    assert grabber.stats()["state"] == SourceState.ENDED


def test_directory_skips_undecodable_files_and_comes_back_when_created(tmp_path):
    folder = tmp_path / "frames"
    grabber = Grabber(source_factory("dir://%s" % folder, SourceConfig()),
                      backoff_initial_s=0.05, backoff_max_s=0.2).start()
    wait_for(lambda: grabber.failures >= 1, timeout=10)   # missing: failing with backoff
    assert grabber.frames == 0
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(5):
        cv2.imwrite(str(staging / ("%03d.png" % i)), np.full((24, 24, 3), i * 40, np.uint8))
    (staging / "002b.png").write_bytes(b"not a png")
    staging.rename(folder)
    frames = _drain(grabber)
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 40, 80, 120, 160]
    assert grabber.reconnects >= 1
    grabber.stop()


def _write_video(path, frames=12):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()


def test_video_file_is_read_to_the_end_and_reconnected_when_it_comes_back(tmp_path):
    video = tmp_path / "clip.avi"
    config = SourceConfig(backend="opencv")
    with pytest.raises(UnknownSource, match="does not exist"):   # a config error at start
        source_factory("file://%s" % video, config)
    video.write_bytes(b"")
    factory = source_factory("file://%s" % video, config)
    video.unlink()                                          # gone after the start
    grabber = Grabber(factory, backoff_initial_s=0.05, backoff_max_s=0.2).start()
    wait_for(lambda: grabber.failures >= 1, timeout=10)   # not there
    assert grabber.frames == 0
    _write_video(tmp_path / "tmp.avi")
    (tmp_path / "tmp.avi").rename(video)
    frames = _drain(grabber)
    assert len(frames) == 12 and frames[0].image.shape == (48, 64, 3)
    assert grabber.reconnects >= 1 and grabber.ended


class _LiveFake(FrameSource):
    """A camera at ~200 fps that hangs for good after ``hang_after`` frames (opencv#22677)."""

    opened = 0

    def __init__(self, hang_after=None):
        super().__init__("fake://live")
        self.hang_after, self.count = hang_after, 0

    def open(self):
        type(self).opened += 1

    def read(self):
        if self.hang_after is not None and self.count >= self.hang_after:
            threading.Event().wait(3600)
        time.sleep(0.005)
        self.count += 1
        return Frame(np.zeros((4, 4, 3), np.uint8), self.count, time.monotonic())


def test_live_source_keeps_only_the_newest_frame_and_counts_drops():
    grabber = Grabber(lambda: _LiveFake()).start()
    time.sleep(0.5)                       # nobody consumes: frames pile up as drops
    frame = grabber.get(1.0)
    assert grabber.drops > 20 and frame.index >= grabber.drops
    grabber.stop()


def test_a_hung_read_is_abandoned_and_the_source_rebuilt():
    _LiveFake.opened = 0
    grabber = Grabber(lambda: _LiveFake(hang_after=5), read_timeout_s=0.3,
                      backoff_initial_s=0.05, backoff_max_s=0.1).start()
    deadline = time.monotonic() + 10
    while grabber.reconnects < 2 and time.monotonic() < deadline:
        grabber.get(0.05)
    stats = grabber.stats()
    grabber.stop()
    assert stats["reconnects"] >= 2 and _LiveFake.opened >= 3
    assert "no frame for 0.3 s" in stats["last_error"]


def test_a_failing_open_backs_off_exponentially():
    class Dead(FrameSource):
        def open(self):
            raise CaptureError("no camera")

        def read(self):
            raise EndOfStream()

    grabber = Grabber(lambda: Dead("fake://dead"), backoff_initial_s=0.05,
                      backoff_max_s=0.4).start()
    time.sleep(1.2)
    grabber.stop()
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.4 ...: about 5 attempts in 1.2 s, not 24
    assert 3 <= grabber.failures <= 7
    assert "no camera" in grabber.last_error


@pytest.mark.parametrize("uri, hint", [("/dev/video0", "v4l2:///dev/video0"),
                                       ("clip.mp4", "file://")])
def test_a_bare_path_gets_the_uri_it_stands_for(uri, hint):
    with pytest.raises(UnknownSource, match="did you mean %s" % hint):
        source_factory(uri, SourceConfig(backend="opencv"))
