"""Helpers for tests that run a daemon in-process."""

import threading

from daemon.config import load_config
from daemon.service import Daemon

from .grabbing import wait_for  # noqa: F401 - the daemon tests' import point

REPLAY = "replay://cifar10?schedule=clean:64,gaussian_noise:4000&severity=5&seed=0"
FAST = ["learner.batch_size=16", "learner.fresh_frames=8", "learner.min_batch_size=4",
        "memory.poll_s=0.05", "telemetry.interval_s=0.2", "threads=1"]


def small_config(*extra, uri=REPLAY):
    return load_config(None, ["source.uri=" + uri] + FAST + list(extra), environ={})


class Running:
    """A daemon serving in a background thread, stopped on exit."""

    def __init__(self, config):
        self.daemon = Daemon(config)
        self.final = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.final = self.daemon.run()

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.daemon.control is not None or not self.daemon.config.control.enabled)
        return self.daemon

    def __exit__(self, *exc):
        self.daemon.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
