"""Every daemon test gets its own runtime (sockets) and state (checkpoints) directories."""

import shutil
import tempfile

import pytest


@pytest.fixture(autouse=True)
def private_dirs(monkeypatch):
    # short paths: an ipc socket path must fit in 107 bytes
    root = tempfile.mkdtemp(prefix="sg", dir="/tmp")
    monkeypatch.setenv("RUNTIME_DIRECTORY", root + "/run")
    monkeypatch.setenv("STATE_DIRECTORY", root + "/state")
    monkeypatch.delenv("SURGEON_ENDPOINT", raising=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)
