"""kill -9 of a daemon that saves checkpoints as fast as it can, and its restart, in a loop.

The default suite runs SURGEON_KILL_ROUNDS=3 rounds; ``make stress`` runs 50.
"""

import os
import random
import signal
import subprocess
import sys
import time

from daemon.checkpoints import CheckpointStore
from daemon.control.client import ControlClient

from .running import REPLAY, small_config, wait_for

ROUNDS = int(os.environ.get("SURGEON_KILL_ROUNDS", "3"))
SETTINGS = ["source.uri=" + REPLAY.replace("seed=0", "seed=0&fps=100"), "learner.batch_size=16",
            "learner.fresh_frames=8", "learner.min_batch_size=4", "threads=1",
            "telemetry.interval_s=0.05", "checkpoints.every_s=0.05", "checkpoints.keep_last=3"]


def _start(log_path):
    args = [sys.executable, "-m", "daemon.cli", "run"]
    for item in SETTINGS:
        args += ["--set", item]
    log = open(log_path, "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log


def _newest_seq(store):
    entries = [e for e in store.list() if "error" not in e]
    return entries[-1]["seq"] if entries else 0


def test_kill_9_while_saving_then_restart(tmp_path):
    from daemon.service import Daemon

    probe = Daemon(small_config("learner.enabled=false", "control.enabled=false",
                                "checkpoints.resume=none"))
    store = CheckpointStore(probe.ops.store.directory, probe.ops.fingerprint, 3)
    endpoint = "ipc://%s/control.sock" % os.environ["RUNTIME_DIRECTORY"]
    rng, expected, loaded = random.Random(1), None, 0
    for round_ in range(ROUNDS + 1):
        log_path = tmp_path / ("round%d.log" % round_)
        process, log = _start(log_path)
        try:
            ControlClient(endpoint, timeout_s=30, retries=1).call("ping")
            if expected is not None:    # it came back, from the checkpoint that was newest
                assert "resumed from checkpoint %s" % expected in log_path.read_text()
            if round_ == ROUNDS:
                break
            floor = _newest_seq(store)
            wait_for(lambda: _newest_seq(store) > floor + 2, timeout=60)
            time.sleep(rng.uniform(0.0, 0.2))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            newest = [e for e in store.list()][-1]
            state, meta = store.load(newest["name"])   # the newest on disk always loads
            assert "model" in state and meta["name"] == newest["name"]
            loaded += 1
            expected = newest["name"]
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
            log.close()
    assert loaded == ROUNDS
