"""Bad source parameters, special and slow files, hung readers, and SIGHUP (issue 17)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from daemon.cli import main
from daemon.config import ConfigError, SourceConfig
from daemon.service import Daemon
from daemon.sources import FrameSource, Grabber, source_factory
from daemon.sources import grabber as grabber_module

from .grabbing import drain as _drain
from .running import small_config, wait_for

cv2 = pytest.importorskip("cv2")


@pytest.mark.parametrize("setting", [
    "source.uri=dir:///tmp?fps=abc", "source.uri=synthetic://?fps=1e-300",
    "source.uri=synthetic://?width=-5", "source.uri=synthetic://?frames=0",
    "source.uri=synthetic://?fsp=3", "source.uri=synthetic://?fps=1&fps=2",
    "source.uri=replay://cifar10?severity=9", "source.uri=replay://imagenet",
    "source.uri=replay://cifar10?loop=maybe", "source.uri=file:///tmp/x.mp4?loop=2",
    "learner.method_args.nonsense=1", "output.predictions=/proc/nope/p.jsonl",
    "telemetry.jsonl=/proc/t.jsonl", "checkpoints.directory=/proc/ckpt",
])
def test_config_check_refuses_what_run_refuses(setting, capsys):
    assert main(["config", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("surgeond: ")
    with pytest.raises(ConfigError):
        Daemon(small_config(setting))


def _images(folder, count):
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / ("%02d.png" % i)), np.full((16, 16, 3), i * 10, np.uint8))


def test_special_files_in_a_frame_directory_are_skipped(tmp_path):
    folder = tmp_path / "frames"
    _images(folder, 4)
    os.mkfifo(str(folder / "01b.png"))                        # would block imread forever
    os.symlink("/dev/zero", str(folder / "02b.png"))
    (folder / "03b.png").write_bytes(b"\x89PNG" + b"\x00" * (2 << 20))   # over max_mb
    grabber = Grabber(source_factory("dir://%s?max_mb=1" % folder, SourceConfig()),
                      read_timeout_s=2.0).start()
    frames = _drain(grabber, 10)
    grabber.stop()
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 10, 20, 30]
    assert grabber.reconnects == 0


def test_a_decode_slower_than_the_read_timeout_moves_on(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    _images(folder, 6)
    real_imread = cv2.imread

    def slow_on_the_first(path, flags):
        if path.endswith("00.png"):
            time.sleep(1.0)
        return real_imread(path, flags)

    monkeypatch.setattr(cv2, "imread", slow_on_the_first)
    grabber = Grabber(source_factory("dir://%s" % folder, SourceConfig()), read_timeout_s=0.3,
                      backoff_initial_s=0.05).start()
    frames = _drain(grabber, 10)
    grabber.stop()
    # the stalled file is given up on; the stream goes on from the next one, once
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 30, 40, 50]
    assert grabber.reconnects == 1


class _Hangs(FrameSource):
    def open(self):
        pass

    def read(self):
        threading.Event().wait(30)


def test_hung_readers_are_bounded_and_the_source_reported_stuck():
    before = set(threading.enumerate())     # other tests' abandoned readers
    grabber = Grabber(lambda: _Hangs("fake://hangs"), read_timeout_s=0.1,
                      backoff_initial_s=0.02, backoff_max_s=0.05).start()
    wait_for(lambda: grabber.stuck, timeout=10)
    time.sleep(0.5)
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith("grab-")
               and t.is_alive()]
    assert len(readers) <= grabber_module.MAX_HUNG + 1
    assert "still blocked" in grabber.last_error
    grabber.stop()


def test_a_factory_that_raises_is_a_failed_attempt_not_a_dead_thread():
    calls = []

    def factory():
        calls.append(1)
        raise RuntimeError("driver gone")

    grabber = Grabber(factory, backoff_initial_s=0.02, backoff_max_s=0.05).start()
    wait_for(lambda: len(calls) >= 3, timeout=10)
    assert "driver gone" in grabber.last_error and grabber._supervisor.is_alive()
    grabber.stop()


def test_sighup_reopens_output_files_and_does_not_stop_the_daemon(tmp_path):
    predictions = tmp_path / "p.jsonl"
    args = [sys.executable, "-m", "daemon.cli", "run", "--set",
            "source.uri=synthetic://?width=32&height=32&fps=50", "--set",
            "learner.enabled=false", "--set", "output.predictions=%s" % predictions,
            "--set", "control.enabled=false", "--set", "threads=1"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: predictions.exists() and predictions.stat().st_size > 0, timeout=90)
        rotated = tmp_path / "p.jsonl.1"
        predictions.rename(rotated)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: predictions.exists() and predictions.stat().st_size > 0, timeout=10)
        assert process.poll() is None
        size = rotated.stat().st_size
        time.sleep(0.3)
        assert rotated.stat().st_size == size          # nothing more goes to the old file
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-2000:]
    assert "output files reopened" in output


def test_a_full_disk_under_an_output_file_drops_lines_without_raising():
    from daemon.telemetry import JsonlWriter

    writer = JsonlWriter("/dev/full")         # every write fails with ENOSPC
    for index in range(3):
        writer.write({"frame": index})
    assert writer.failed_writes == 3
    writer.close()


def test_output_files_rotate_by_size_and_keep_a_bounded_count(tmp_path):
    from daemon.telemetry import JsonlWriter

    path = tmp_path / "telemetry.jsonl"
    writer = JsonlWriter(str(path), rotate_mb=1024 / 2**20, keep=3)   # 1 KiB per file
    for index in range(200):
        writer.write({"frame": index, "pad": "x" * 40})
    writer.close()
    kept = [path] + [tmp_path / ("telemetry.jsonl.%d" % n) for n in (1, 2, 3)]
    assert all(p.exists() for p in kept) and not (tmp_path / "telemetry.jsonl.4").exists()
    assert writer.rotations > 3 and all(p.stat().st_size < 1200 for p in kept)
    frames = [json.loads(line)["frame"] for p in reversed(kept)
              for line in p.read_text().splitlines()]
    assert frames == list(range(frames[0], 200))    # newest files whole and in order
