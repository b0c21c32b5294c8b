import json
import os
import pickle
import random
import signal
import time

import pytest
import torch

from daemon.checkpoints import CheckpointError, CheckpointStore, model_fingerprint
from surgeon_core.models import cifar_resnet_by_name


@pytest.fixture(scope="module")
def state(resnet20_weights):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    return {"model": model.state_dict()}


@pytest.fixture
def store(tmp_path, state):
    return CheckpointStore(tmp_path / "ckpt", model_fingerprint("resnet20", state["model"]), 2)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_list_load_delete(store, state):
    entry = store.save("before-rain", state, {"steps": 7, "arch": "resnet20"})
    assert entry["name"] == "before-rain" and entry["bytes"] > 1e5 and len(entry["sha256"]) == 64
    loaded, meta = store.load("before-rain")
    assert _equal(loaded["model"], state["model"]) and meta["steps"] == 7
    assert [e["name"] for e in store.list()] == ["before-rain"]
    assert oct(store.directory.stat().st_mode & 0o777) == "0o700"
    store.delete("before-rain")
    assert store.list() == []
    with pytest.raises(CheckpointError) as caught:
        store.load("before-rain")
    assert caught.value.code == "NOT_FOUND"


def test_retention_keeps_the_last_automatic_ones_and_every_named_one(store, state):
    store.save("keep-me", state, {})
    names = [store.save(None, state, {})["name"] for _ in range(4)]
    assert [e["name"] for e in store.list()] == ["keep-me"] + names[-2:]
    assert sorted(p.name for p in store.directory.glob("*.pt")) == sorted(
        ["keep-me.pt"] + [n + ".pt" for n in names[-2:]])


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", "", ".hidden", "x" * 65,
                                  "a..b", "auto-000001", "semi;colon"])
def test_names_that_could_escape_or_collide_are_refused(store, state, name):
    with pytest.raises(CheckpointError) as caught:
        store.save(name, state, {})
    assert caught.value.code == "INVALID_ARGS"
    assert list(store.directory.iterdir()) == []


def test_a_checkpoint_for_another_model_is_refused(tmp_path, store, state, resnet20_weights):
    other = {"model": cifar_resnet_by_name("resnet32").state_dict()}
    foreign = CheckpointStore(store.directory, model_fingerprint("resnet32", other["model"]))
    foreign.save("r32", other, {"arch": "resnet32"})
    with pytest.raises(CheckpointError, match="made for another model.*resnet32") as caught:
        store.load("r32")
    assert caught.value.code == "CONFLICT"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch %s" % self.marker,))


def test_a_file_that_runs_code_when_unpickled_is_refused(store, tmp_path):
    marker = tmp_path / "pwned"
    # a torch-format archive whose pickle calls os.system, and a raw pickle of the same
    torch.save({"format": "surgeon-checkpoint", "meta": {}, "state": {"x": _Exploit(marker)}},
               store.path("evil"))
    store.path("evil2").write_bytes(pickle.dumps(_Exploit(marker)))
    for name in ("evil", "evil2"):
        with pytest.raises(CheckpointError) as caught:
            store.load(name)
        assert caught.value.code == "CORRUPT"
    assert not marker.exists()


def test_damaged_files_are_refused_and_listed_with_the_reason(store, state):
    store.save("good", state, {})
    data = store.path("good").read_bytes()
    store.path("good").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SHA-256") as caught:
        store.load("good")
    assert caught.value.code == "CORRUPT"
    store.path("orphan").write_bytes(b"\x00" * 100)   # not in the manifest
    orphan = [e for e in store.list() if e["name"] == "orphan"][0]
    assert "not a loadable checkpoint" in orphan["error"]


def test_a_checkpoint_saved_before_the_manifest_is_still_found(store, state):
    store.save("a", state, {"steps": 1})
    store.save("b", state, {"steps": 2})
    store.manifest_path.write_text(json.dumps({"checkpoints": [{"name": "a", "seq": 1}]}))
    names = [e["name"] for e in store.list()]
    assert names == ["a", "b"]
    assert store.load("b")[1]["steps"] == 2
    store.manifest_path.write_text("{ torn")
    assert [e["name"] for e in store.list()] == ["a", "b"]


def test_kill_9_during_saves_never_leaves_a_broken_newest(store, state, tmp_path):
    """50 saving processes killed at random moments; the newest file always loads."""
    rng = random.Random(0)
    killed_mid_write = 0
    for _ in range(50):
        pid = os.fork()
        if pid == 0:   # the child saves as fast as it can until killed
            try:
                while True:
                    store.save(None, state, {"pid": os.getpid()})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed_mid_write += any(store.directory.glob(".*.tmp"))
        reopened = CheckpointStore(store.directory, store.fingerprint, store.keep_last)
        newest = reopened.list()[-1]
        loaded, meta = reopened.load(newest["name"])
        assert _equal(loaded["model"], state["model"])
        assert not any(reopened.directory.glob(".*.tmp"))   # leftovers are cleaned at open
    assert killed_mid_write > 0   # the kills did land inside writes
