"""sd_notify against a test NOTIFY_SOCKET: READY, STATUS, WATCHDOG only while both loops run,
STOPPING; and the unit files through systemd-analyze."""

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemon.sdnotify import Notifier

from .running import Running, small_config, wait_for

ROOT = Path(__file__).parents[2]


@pytest.fixture
def notify_socket(monkeypatch, private_dirs):
    path = os.path.join(private_dirs, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")    # pings withheld after 1 s of silence
    yield sock
    sock.close()


class _Inbox:
    def __init__(self, sock):
        self.sock, self.messages = sock, []

    def pump(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def watchdogs_since(self, since):
        return sum("WATCHDOG=1" in m for t, m in self.messages if t >= since)


def _hang(target, name):
    """Replace ``target.name`` with a call that blocks until ``release`` is set; ``entered`` is
    set once a call is blocked there."""
    entered, release, original = threading.Event(), threading.Event(), getattr(target, name)

    def blocked(*args, **kwargs):
        entered.set()
        release.wait()
        return original(*args, **kwargs)

    setattr(target, name, blocked)
    return entered, release


def test_ready_status_watchdog_and_stopping(notify_socket):
    inbox = _Inbox(notify_socket)
    with Running(small_config("learner.fresh_frames=4")) as daemon:
        inbox.pump(3)
        text = "\n".join(m for _, m in inbox.messages)
        assert "READY=1" in text and "STATUS=" in text and "fps" in text
        assert inbox.watchdogs_since(0) >= 3
        wait_for(lambda: daemon.learner.steps >= 1)

        for target, name, reason in ((daemon.method, "step", "learner silent"),
                                     (daemon.serving, "predict", "serving loop silent")):
            entered, release = _hang(target, name)       # the learner, then serving, hangs
            deadline = time.monotonic() + 30
            while not entered.is_set() and time.monotonic() < deadline:
                inbox.pump(0.05)                         # stamps pings as they come
            assert entered.is_set()
            inbox.pump(2.5)                              # silent after 1 s, pinged every 0.5 s
            assert inbox.watchdogs_since(time.monotonic() - 1.2) == 0
            assert reason in daemon_health(daemon)
            release.set()
            inbox.pump(1.5)
            assert inbox.watchdogs_since(time.monotonic() - 1.0) >= 1
    inbox.pump(0.3)
    assert "STOPPING=1" in inbox.messages[-1][1] or any("STOPPING=1" in m
                                                         for _, m in inbox.messages)


def daemon_health(daemon):
    return daemon.health.withheld or ""


def test_a_paused_learner_still_counts_as_alive(notify_socket):
    inbox = _Inbox(notify_socket)
    with Running(small_config()) as daemon:
        daemon.learner.pause(True)
        inbox.pump(2.5)
        assert inbox.watchdogs_since(time.monotonic() - 1.2) >= 1


def test_notifier_addresses_and_watchdog_ownership():
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert not Notifier({}).enabled and Notifier({}).ready() is False
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_s == 30.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    mine = {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_s == 5.0


@pytest.mark.parametrize("unit", ["surgeond.service", "surgeond-docker.service"])
def test_units_pass_systemd_analyze_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify resolves ExecStart binaries: point them at stand-ins that exist here
    text = (ROOT / "systemd" / unit).read_text()
    for binary in ("/opt/surgeon/venv/bin/surgeond", "/usr/bin/docker"):
        stand_in = tmp_path / os.path.basename(binary)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        text = text.replace(binary, str(stand_in))
    (tmp_path / unit).write_text(text)
    # units it Requires= that this machine lacks: minimal stand-ins beside it
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=%s\n" % stand_in)
    done = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if unit in line or "Unknown" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
