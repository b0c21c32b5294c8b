"""Every command against a running daemon, its visible effect, the PUB stream, security."""

import json
import logging
import os
import stat
import time

import pytest
import torch
import zmq

from surgeon_core import package_version
from daemon.config import ConfigError
from daemon.control.client import ControlClient, DaemonError, Unreachable
from daemon.control.server import ControlError
from daemon.memory import MB

from .ports import free_port
from .running import Running, small_config, wait_for


def _client(daemon, **kwargs):
    return ControlClient(daemon.control.endpoint, **kwargs)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _quiesce(daemon):
    """Wait out a step in progress (or one that started just before the pause)."""
    daemon.learner.export_state()
    time.sleep(0.2)
    daemon.learner.export_state()


def _events(client, daemon):
    """A SUB socket on the daemon's PUB, already joined (it drops what comes before)."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(daemon.control.pub_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert sub.poll(5000), "no telemetry on the PUB socket"
    return sub


def _drain(sub, topic_prefix, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(100):
            topic, body = sub.recv_multipart()
            if topic.decode().startswith(topic_prefix):
                return topic.decode(), json.loads(body)
    raise AssertionError("no %s message" % topic_prefix)


def test_status_telemetry_and_the_pub_stream():
    with Running(small_config()) as daemon:
        client = _client(daemon)
        assert client.call("ping")["pong"] is True
        wait_for(lambda: daemon.learner.steps >= 2)
        status = client.call("status")
        assert status["arch"] == "cifar:resnet20" and status["learner"]["state"] == "running"
        assert status["frames"] > 0 and len(status["model_fingerprint"]) == 16
        assert status["peak_mb"] > 0 and status["resident_peak_mb"] > status["peak_mb"]
        assert status["peak_budget_mb"] > 0 and status["micro_batches"] >= 1
        assert status["allocator"] == "glibc, %s" % daemon.config.memory.malloc
        assert status["version"] == package_version()
        assert "step peak %.0f/%.0f MB" % (daemon.telemetry.gauges["peak_mb"],
                                            daemon.telemetry.gauges["peak_budget_mb"]) \
            in daemon.status_line()
        snap = client.call("telemetry")
        assert snap["counters"]["frames"] > 0 and "infer" in snap["latency_ms"]
        sub = _events(client, daemon)
        topic, telemetry = _drain(sub, "telemetry")
        assert telemetry["counters"]["frames"] > 0
        assert _drain(sub, "prediction")[1]["class"] in range(10)
        client.call("adapt.pause")
        topic, event = _drain(sub, "event.learner.paused")
        assert event["reason"] == "operator"
        client.call("budget.set", {"mb": 2})
        topic, event = _drain(sub, "event.budget.changed")
        assert event["budget_mb"] == 2.0 and "cap" in event["reason"]
        client.call("source.restart")
        topic, event = _drain(sub, "event.source.up")
        assert event["previous"] == "connecting" and "replay" in event["source"]
        sub.close()


def test_pause_stops_steps_and_resume_restarts_them():
    with Running(small_config()) as daemon:
        client = _client(daemon)
        wait_for(lambda: daemon.learner.steps >= 2)
        assert client.call("adapt.pause")["learner"] == "paused"
        _quiesce(daemon)
        steps, frames = daemon.learner.steps, daemon.frames
        time.sleep(1.5)
        assert daemon.learner.steps == steps and daemon.frames > frames
        assert client.call("adapt.resume")["learner"] == "running"
        wait_for(lambda: daemon.learner.steps >= steps + 2)


def test_reset_restores_the_source_weights_exactly():
    with Running(small_config()) as daemon:
        source = {k: v.clone() for k, v in daemon.serving.model.state_dict().items()}
        wait_for(lambda: daemon.learner.steps >= 3)
        client = _client(daemon)
        client.call("adapt.pause")
        _quiesce(daemon)
        assert not _same(daemon.serving.model.state_dict(), source)   # adaptation changed it
        assert client.call("model.reset")["reset"] is True
        assert _same(daemon.serving.model.state_dict(), source)
        assert _same(daemon.method.model.state_dict(), source)


def test_budget_set_changes_the_measured_cache():
    with Running(small_config("memory.budget_mb=8")) as daemon:
        client = _client(daemon)
        wait_for(lambda: daemon.learner.steps >= 3)
        before = max(cache for _, cache, _ in daemon.learner.step_log)
        assert client.call("budget.set", {"mb": 0.5})["budget_mb"] == 0.5
        assert client.call("config.get", {"key": "memory.budget_mb"})["value"] == 0.5
        start = daemon.learner.steps + 1
        wait_for(lambda: daemon.learner.steps >= start + 3)
        after = [(cache, budget) for step, cache, budget in daemon.learner.step_log
                 if step > start]
        assert all(budget == int(0.5 * MB) and cache <= budget for cache, budget in after)
        assert max(cache for cache, _ in after) < before


def test_live_settings_are_validated_and_applied():
    with Running(small_config()) as daemon:
        client = _client(daemon)
        assert client.call("config.set", {"key": "learner.method_args.lr",
                                          "value": 0.0005})["value"] == 0.0005
        assert daemon.method.optimizer.param_groups[0]["lr"] == 0.0005
        assert client.call("config.get", {"key": "learner.method_args.lr"})["value"] == 0.0005
        client.call("config.set", {"key": "learner.method_args.margin", "value": 0.3})
        assert daemon.method.args.margin == 0.3
        client.call("config.set", {"key": "learner.batch_size", "value": 8})
        assert daemon.learner.batch_size == 8
        client.call("config.set", {"key": "learner.enabled", "value": False})
        assert daemon.learner.user_paused
        for key, value, code in [("learner.batch_size", 0, "INVALID_ARGS"),
                                 ("learner.batch_size", "many", "INVALID_ARGS"),
                                 ("learner.method_args.lr", -1, "INVALID_ARGS"),
                                 ("model.arch", "resnet56", "INVALID_ARGS"),
                                 ("log_level", "LOUD", "INVALID_ARGS")]:
            with pytest.raises(DaemonError) as caught:
                client.call("config.set", {"key": key, "value": value})
            assert caught.value.code == code, (key, value)
        assert daemon.learner.batch_size == 8 and daemon.config.log_level == "INFO"
        with pytest.raises(DaemonError) as caught:
            client.call("config.get", {"key": "learner.nonsense"})
        assert caught.value.code == "NOT_FOUND"
        assert client.call("config.get")["value"]["model"]["arch"] == "cifar:resnet20"


def test_checkpoint_commands_round_trip():
    with Running(small_config()) as daemon:
        client = _client(daemon)
        wait_for(lambda: daemon.learner.steps >= 2)
        client.call("adapt.pause")
        _quiesce(daemon)
        entry = client.call("checkpoint.save", {"name": "before-fog"})
        assert entry["name"] == "before-fog" and entry["steps"] >= 2
        saved_state = daemon.ops.store.load("before-fog")[0]["model"]
        client.call("model.reset")
        assert not _same(daemon.serving.model.state_dict(), saved_state)
        loaded = client.call("checkpoint.load", {"name": "before-fog"})
        assert loaded["name"] == "before-fog" and loaded["note"] == ""
        assert _same(daemon.method.model.state_dict(), saved_state)
        assert _same(daemon.serving.model.state_dict(), saved_state)
        names = [e["name"] for e in client.call("checkpoint.list")["checkpoints"]]
        assert names == ["before-fog"]
        for cmd, args, code in [("checkpoint.load", {"name": "missing"}, "NOT_FOUND"),
                                ("checkpoint.load", {"name": "../../etc/passwd"}, "INVALID_ARGS"),
                                ("checkpoint.save", {"name": "a/b"}, "INVALID_ARGS"),
                                ("checkpoint.delete", {"name": "missing"}, "NOT_FOUND")]:
            with pytest.raises(DaemonError) as caught:
                client.call(cmd, args)
            assert caught.value.code == code
        assert client.call("checkpoint.delete", {"name": "before-fog"})["deleted"] == "before-fog"
        assert client.call("checkpoint.list")["checkpoints"] == []


def test_long_commands_can_be_accepted_and_announced():
    with Running(small_config()) as daemon:
        client = _client(daemon)
        sub = _events(client, daemon)
        reply = client.request("checkpoint.save", {"name": "later"}, mode="accept")
        assert reply["result"]["accepted"] is True
        topic, event = _drain(sub, "event.job")
        assert event["job"] == reply["id"] and event["ok"] and event["result"]["name"] == "later"
        sub.close()


def test_a_retried_request_runs_once():
    with Running(small_config()) as daemon:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.control.endpoint)
        request = json.dumps({"v": 1, "id": "same", "cmd": "checkpoint.save", "args": {}})
        for _ in range(3):
            sock.send(request.encode())
        replies = [json.loads(sock.recv()) for _ in range(3)]
        assert len({r["result"]["name"] for r in replies}) == 1
        assert len(_client(daemon).call("checkpoint.list")["checkpoints"]) == 1
        sock.close()


def test_source_restart_and_shutdown_with_a_checkpoint():
    runner = Running(small_config())
    with runner as daemon:
        client = _client(daemon)
        wait_for(lambda: daemon.learner.steps >= 2)
        before = daemon.grabber.reconnects
        client.call("source.restart")
        wait_for(lambda: daemon.grabber.reconnects == before + 1
                 and daemon.grabber.state == "streaming")
        assert client.call("shutdown")["stopping"] is True
        wait_for(lambda: not runner.thread.is_alive(), timeout=30)
    names = [p.name for p in daemon.ops.store.directory.glob("auto-*.pt")]
    assert len(names) == 1   # saved on the way out
    assert not os.path.exists(daemon.control.endpoint[len("ipc://"):])


def test_restart_resumes_the_newest_checkpoint_and_falls_back_when_all_are_bad(caplog):
    caplog.set_level(logging.INFO, "surgeond")
    with Running(small_config()) as daemon:
        wait_for(lambda: daemon.learner.steps >= 2)
    adapted = {k: v.clone() for k, v in daemon.method.model.state_dict().items()}
    store = daemon.ops.store
    with Running(small_config("learner.enabled=false")) as again:
        assert again.ops.resumed_from == store.list()[-1]["name"]
        assert _same(again.serving.model.state_dict(), adapted)
    for entry in store.list():
        store.path(entry["name"]).write_bytes(b"torn")
    caplog.clear()
    with Running(small_config("learner.enabled=false")) as third:
        assert third.ops.resumed_from is None
    assert "starting from the source weights (no usable checkpoint)" in caplog.text
    assert "not a loadable checkpoint" in caplog.text or "SHA-256" in caplog.text


def test_garbage_floods_get_error_replies_while_serving_goes_on(caplog):
    """10,000 malformed, oversized, wrong-type and unknown-command messages."""
    caplog.set_level(logging.WARNING, "surgeond.control")
    big = b'{"v":1,"id":"big","cmd":"ping","args":{"pad":"' + b"x" * 70000 + b'"}}'
    kinds = [b"\x00\xff garbage", b"[1,2,3]", b'{"v":1,"id":"w","cmd":"budget.set",'
             b'"args":{"mb":"lots"}}', b'{"v":1,"id":"u","cmd":"rm.rf"}', b'{"v":9}',
             b'{"v":1,"id":"e","cmd":"ping","args":{"evil":1}}', b""]
    # above the default rate limit so the test takes seconds; `surgeond bench-control` measures
    # serving under a flood at the default
    with Running(small_config("control.max_requests_per_s=20000")) as daemon:
        wait_for(lambda: daemon.frames > 20)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.control.endpoint)
        frames_before, codes, sent = daemon.frames, {}, 0
        start = time.monotonic()
        while sent < 10_000:
            # one in 40 is oversized (70 kB), the rest cycle through the small kinds
            batch = [big if (sent + i) % 40 == 0 else kinds[(sent + i) % len(kinds)]
                     for i in range(250)]
            for message in batch:
                sock.send(message)
            for _ in batch:
                assert sock.poll(10000), "a bad request got no reply"
                reply = json.loads(sock.recv())
                assert reply["ok"] is False
                codes[reply["error"]["code"]] = codes.get(reply["error"]["code"], 0) + 1
            sent += len(batch)
        seconds = time.monotonic() - start
        served_during = daemon.frames - frames_before
        assert _client(daemon).call("ping")["pong"]
        sock.close()
    assert sum(codes.values()) == 10_000
    assert set(codes) == {"BAD_JSON", "INVALID_ARGS", "UNKNOWN_COMMAND", "UNSUPPORTED_VERSION",
                          "TOO_LARGE"}
    assert served_during > 0, "serving stopped during the flood"
    assert len([r for r in caplog.records if "bad control request" in r.message]) <= 2
    print("flood: 10000 replies in %.1f s, %d frames served meanwhile, codes %s"
          % (seconds, served_during, codes))


def test_sockets_are_owner_only_and_a_second_daemon_is_refused(private_dirs):
    with Running(small_config()) as daemon:
        path = daemon.control.endpoint[len("ipc://"):]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        second = Running(small_config("learner.enabled=false")).daemon
        with pytest.raises(ControlError, match="already answers"):
            second._start_control()
        assert _client(daemon).call("ping")["pong"]


def test_group_access_and_loopback_tcp(private_dirs):
    with Running(small_config("control.socket_access=group", "control.endpoint=tcp://127.0.0.1:0"
                              .replace(":0", ":%d" % free_port()))) as daemon:
        assert daemon.control.endpoint.startswith("tcp://127.0.0.1:")
        assert _client(daemon).call("ping")["pong"]
        pub = daemon.control.pub_endpoint[len("ipc://"):]
        assert stat.S_IMODE(os.stat(pub).st_mode) == 0o660


def test_open_tcp_without_curve_is_refused_at_start():
    with pytest.raises(ConfigError, match="control.*without CURVE"):
        small_config("control.endpoint=tcp://0.0.0.0:5599")




def test_curve_answers_only_clients_with_the_right_keys(tmp_path):
    from daemon.control.client import curve_keys
    from daemon.control.security import make_certificates

    server_public, server_secret = make_certificates(tmp_path / "server", "server")
    allowed_public, allowed_secret = make_certificates(tmp_path / "clients", "ops")
    make_certificates(tmp_path / "strangers", "eve")
    port = free_port()
    config = small_config("learner.enabled=false", "control.endpoint=tcp://0.0.0.0:%d" % port,
                          "control.curve_server_cert=%s" % server_secret,
                          "control.curve_clients_dir=%s" % (tmp_path / "clients"))
    endpoint = "tcp://127.0.0.1:%d" % port
    with Running(config):
        keys = curve_keys(str(server_public), str(allowed_secret))
        assert ControlClient(endpoint, curve=keys).call("ping")["pong"]
        quick = dict(timeout_s=0.5, retries=1)
        strangers = [None,                                                     # plain text
                     curve_keys(str(server_public), str(tmp_path / "strangers" /
                                                        "eve.key_secret")),    # not allowed
                     curve_keys(str(allowed_public), str(allowed_secret))]     # wrong server key
        for keys in strangers:
            with pytest.raises(Unreachable):
                ControlClient(endpoint, curve=keys, **quick).call("ping")
