"""The checkpoint store against careless operators, other users and a full disk (issue 17)."""

import errno
import os
import shutil
import threading

import pytest
import torch

from daemon.checkpoints import CheckpointError, CheckpointStore, model_fingerprint
from daemon.config import ConfigError
from daemon.control.commands import COMMANDS
from daemon.service import Daemon

from .running import Running, small_config


@pytest.fixture(scope="module")
def state():
    return {"model": {"w": torch.arange(1000, dtype=torch.float32)}}


@pytest.fixture
def store(tmp_path, state):
    return CheckpointStore(tmp_path / "ckpt", model_fingerprint("toy", state["model"]), 2)


def _names(store):
    return [e["name"] for e in store.list()]


def _files(store):
    return sorted(os.listdir(str(store.directory)))


def test_a_copied_file_is_a_named_checkpoint_and_saves_go_on(store, state):
    first = store.save(None, state, {})
    shutil.copy(str(store.path(first["name"])), str(store.path("keep")))
    for _ in range(4):
        store.save(None, state, {})
    entries = {e["name"]: e for e in store.list()}
    assert "keep" in entries and not entries["keep"]["auto"]
    assert sorted(n for n in entries if n.startswith("auto-")) == ["auto-000004", "auto-000005"]
    assert store.load("keep")[1]["name"] == "keep"


def test_concurrent_saves_are_serialised(store, state):
    errors = []

    def saver():
        for _ in range(10):
            try:
                store.save(None, state, {})
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=saver) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    seqs = [e["seq"] for e in store.list()]
    assert seqs == [29, 30] and len(set(seqs)) == len(seqs)
    assert not [f for f in _files(store) if f.endswith(".tmp")]


def test_one_writer_per_directory(store, state):
    store.acquire()
    second = CheckpointStore(store.directory, store.fingerprint)
    with pytest.raises(CheckpointError, match="in use by another daemon.*pid %d" % os.getpid()):
        second.acquire()
    store.release()
    second.acquire()
    second.release()


def test_special_files_are_never_opened(store, state):
    store.save("good", state, {})
    os.mkfifo(str(store.path("fifo")))
    os.symlink(str(store.path("good")), str(store.path("link")))
    os.symlink("/dev/zero", str(store.path("zero")))
    os.mkfifo(str(store.directory / "manifest.tmp"))
    done = []
    worker = threading.Thread(target=lambda: done.append(store.list()), daemon=True)
    worker.start()
    worker.join(10)
    assert done, "list() blocked on a special file"
    entries = {e["name"]: e for e in done[0]}
    assert "error" not in entries["good"]
    for name in ("fifo", "link", "zero"):
        assert "not a regular file" in entries[name]["error"]
        with pytest.raises(CheckpointError) as caught:
            store.load(name)
        assert caught.value.code == "CORRUPT"
    os.unlink(str(store.directory / "manifest.json"))
    os.mkfifo(str(store.directory / "manifest.json"))     # a FIFO as the manifest
    worker = threading.Thread(target=lambda: done.append(store.list()), daemon=True)
    worker.start()
    worker.join(10)
    assert len(done) == 2


def test_a_directory_others_can_write_is_refused(tmp_path, state):
    shared = tmp_path / "shared"
    shared.mkdir()
    fingerprint = model_fingerprint("toy", state["model"])
    CheckpointStore(shared, fingerprint).save("planted", state, {})
    os.chmod(str(shared), 0o777)
    with pytest.raises(CheckpointError, match="writable by everyone") as caught:
        CheckpointStore(shared, fingerprint)
    assert caught.value.code == "FORBIDDEN"
    with pytest.raises(ConfigError, match="checkpoints.directory.*chmod go-w"):
        Daemon(small_config("checkpoints.directory=%s" % shared))


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"),
                                         (errno.EROFS, "read-only")])
def test_disk_full_and_read_only_are_reported_and_lose_nothing(store, state, monkeypatch,
                                                               code, words):
    store.save("old", state, {})
    store.save(None, state, {})
    before = _files(store)
    real_fsync = os.fsync

    def failing(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing)
    for name in (None, "new", "old"):
        with pytest.raises(CheckpointError, match=words) as caught:
            store.save(name, state, {})
        assert caught.value.code == "STORAGE"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _files(store) == before
    assert _names(store) == ["old", "auto-000002"]
    assert torch.equal(store.load("old")[0]["model"]["w"], state["model"]["w"])


def test_a_failed_manifest_write_leaves_no_orphan(store, state, monkeypatch):
    store.save(None, state, {})
    before = _files(store)

    def full(entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_manifest", full)
    with pytest.raises(CheckpointError):
        store.save("orphan", state, {})
    with pytest.raises(CheckpointError):
        store.save(None, state, {})
    assert _files(store) == before


def test_checkpoint_list_runs_off_the_control_thread():
    assert COMMANDS["checkpoint.list"].LONG


def test_a_second_daemon_on_the_same_directory_is_refused():
    with Running(small_config("learner.enabled=false")) as daemon:
        directory = daemon.ops.store.directory
        second = Daemon(small_config("learner.enabled=false",
                                     "control.endpoint=ipc://%s/other.sock"
                                     % os.environ["RUNTIME_DIRECTORY"],
                                     "control.pub_endpoint=ipc://%s/other-pub.sock"
                                     % os.environ["RUNTIME_DIRECTORY"]))
        assert second.ops.store.directory == directory
        with pytest.raises(CheckpointError, match="in use by another daemon"):
            second.run()
