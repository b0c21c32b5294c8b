"""Attacks and careless requests against a running daemon's control plane (issue 17): no
message, connection or setting may kill a thread, hang the plane or change what is in force."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import zmq

from daemon.config import ConfigError, ControlConfig, load_config
from daemon.control.client import ControlClient, DaemonError
from daemon.control.server import ControlError, ControlServer

from .ports import free_port
from .running import Running, small_config, wait_for


def _dealer(endpoint, identity=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


def _strict(raw):
    """A reply must be strict JSON: no NaN or Infinity."""
    def refuse(name):
        raise AssertionError("reply holds %s" % name)
    return json.loads(raw, parse_constant=refuse)


def _ask(sock, payload, timeout_ms=10000):
    sock.send_multipart(payload if isinstance(payload, list) else [payload])
    assert sock.poll(timeout_ms), "no reply"
    return _strict(sock.recv_multipart()[-1])


def _request(rid, cmd, **args):
    return json.dumps({"v": 1, "id": rid, "cmd": cmd, "args": args}).encode()


def test_no_message_stops_the_control_thread():
    deep_list = (b'{"v":1,"id":"deep","cmd":"config.set","args":{"key":"log_level","value":'
                 + b"[" * 5000 + b"]" * 5000 + b"}}")
    deep_object = b'{"a":' * 3000 + b"1" + b"}" * 3000
    nested_33 = (b'{"v":1,"id":"n33","cmd":"config.set","args":{"key":"log_level","value":'
                 + b"[" * 31 + b"]" * 31 + b"}}")
    with Running(small_config()) as daemon:
        sock = _dealer(daemon.control.endpoint)
        assert _ask(sock, deep_list)["error"]["code"] == "BAD_JSON"
        assert _ask(sock, deep_object)["error"]["code"] == "BAD_JSON"
        assert _ask(sock, nested_33)["error"]["code"] == "BAD_JSON"
        twice = b'{"v":1,"id":"dup","cmd":"ping","cmd":"shutdown"}'
        reply = _ask(sock, twice)
        assert reply["error"]["code"] == "BAD_REQUEST" and "twice" in reply["error"]["message"]
        assert _ask(sock, b'{"v":1,"id":"inf","cmd":"budget.set","args":{"mb":1e999}}'
                    )["error"]["code"] == "INVALID_ARGS"
        parts = [b""] + [b"x" * 100] * 20000
        assert _ask(sock, parts)["error"]["code"] == "BAD_REQUEST"
        assert _ask(sock, _request("after", "ping"))["result"]["pong"] is True
        health = daemon.control.health()
        assert health["state"] == "ok" and health["faults"] == 0
        sock.close()


def test_the_reply_cache_is_per_client_and_never_answers_another_command():
    with Running(small_config("learner.enabled=false")) as daemon:
        alice = _dealer(daemon.control.endpoint, b"alice")
        mallory = _dealer(daemon.control.endpoint, b"mallory")
        assert _ask(alice, _request("same", "ping"))["result"]["pong"] is True
        status = _ask(mallory, _request("same", "status"))
        assert status["ok"] and "pid" in status["result"]       # its own command ran
        assert _ask(alice, _request("same", "ping"))["result"]["pong"] is True   # a retry
        reused = _ask(alice, _request("same", "checkpoint.save"))
        assert reused["error"]["code"] == "BAD_REQUEST" and "already used" in \
            reused["error"]["message"]
        assert daemon.ops.store.list() == []                   # and it did not run
        alice.close()
        mallory.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_handler_and_a_dead_control_thread_are_recovered(monkeypatch):
    with Running(small_config("learner.enabled=false")) as daemon:
        control = daemon.control
        real_handle = control._handle
        calls = []

        def broken_once(frames):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in a handler")
            real_handle(frames)

        monkeypatch.setattr(control, "_handle", broken_once)
        sock = _dealer(control.endpoint)
        assert _ask(sock, _request("a", "ping"))["error"]["code"] == "INTERNAL"
        assert _ask(sock, _request("b", "ping"))["result"]["pong"] is True
        assert control.health()["faults"] == 1

        real_once = control._serve_once

        def dies(poller):
            monkeypatch.setattr(control, "_serve_once", real_once)
            raise SystemExit("the thread ends, as no Exception handler can stop")

        monkeypatch.setattr(control, "_serve_once", dies)
        wait_for(lambda: not control._threads[0].is_alive(), timeout=10)
        wait_for(lambda: control.health()["state"] == "restarted", timeout=10)
        assert _ask(sock, _request("c", "ping"))["result"]["pong"] is True
        assert ControlClient(control.endpoint).call("status")["control"]["restarts"] == 1
        sock.close()




def test_connections_are_capped_and_the_daemon_keeps_its_descriptors():
    port = free_port()
    config = small_config("control.endpoint=tcp://127.0.0.1:%d" % port,
                          "control.max_connections=8")
    with Running(config) as daemon:
        wait_for(lambda: daemon.learner.steps >= 1)
        peers = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        wait_for(lambda: daemon.control.health()["refused_connections"] >= 190, timeout=20)
        assert daemon.control.health()["connections"]["control"] <= 8
        assert sum(_closed_by_peer(peer) for peer in peers) >= 190
        steps = daemon.learner.steps
        wait_for(lambda: daemon.learner.steps > steps)
        client = ControlClient("tcp://127.0.0.1:%d" % port)
        wait_for(lambda: daemon.control.health()["connections"]["control"] == 0, timeout=40)
        assert client.call("ping")["pong"] is True


def _closed_by_peer(peer, wait_s=2.0):
    """Read (the ZMTP greeting) until the daemon closes the connection, or ``wait_s``."""
    peer.settimeout(wait_s)
    try:
        while peer.recv(4096):
            pass
        return True
    except OSError:
        return False
    finally:
        peer.close()


def test_the_learner_survives_a_transient_fault(monkeypatch):
    with Running(small_config()) as daemon:
        wait_for(lambda: daemon.learner.steps >= 1)
        real_read, failures = daemon.probe.read, []

        def no_descriptors():
            if len(failures) < 2:
                failures.append(1)
                raise OSError(errno.EMFILE, "Too many open files", "/proc/meminfo")
            return real_read()

        monkeypatch.setattr(daemon.probe, "read", no_descriptors)
        wait_for(lambda: len(failures) == 2, timeout=20)
        steps = daemon.learner.steps
        wait_for(lambda: daemon.learner.steps > steps + 1, timeout=30)
        snap = daemon.telemetry.snapshot()
        assert snap["counters"]["learner_faults"] == 2
        assert daemon.ops.learner_state() == "running"


def test_an_empty_curve_certificate_is_unset_and_open_tcp_is_refused_by_one_rule():
    environ = {"SURGEON_CONTROL__CURVE_SERVER_CERT": "",
               "SURGEON_CONTROL__ENDPOINT": "tcp://0.0.0.0:5599"}
    with pytest.raises(ConfigError, match="without CURVE"):
        load_config(None, [], environ=environ)
    # the bind applies the same rule to a config that skipped validation
    unchecked = ControlConfig.model_construct(**dict(ControlConfig().model_dump(),
                                                     endpoint="tcp://0.0.0.0:5599",
                                                     curve_server_cert=""))
    with pytest.raises(ControlError, match="CURVE"):
        ControlServer(unchecked, None, None).start()


def test_refused_live_settings_change_nothing():
    with Running(small_config()) as daemon:
        client = ControlClient(daemon.control.endpoint)
        before = client.call("config.get")["value"]
        refused = [("telemetry.interval_s", 1e10), ("telemetry.interval_s", 1e-9),
                   ("memory.budget_mb", 1e30), ("learner.batch_size", 2),
                   ("learner.batch_size", 1e30), ("learner.batch_size", 4096),
                   ("learner.fresh_frames", 100000), ("memory.reserve_mb", -1),
                   ("learner.method_args.lr", 1e300), ("log_level", None)]
        for key, value in refused:
            with pytest.raises(DaemonError) as caught:
                client.call("config.set", {"key": key, "value": value})
            assert caught.value.code == "INVALID_ARGS", (key, value)
        sock = _dealer(daemon.control.endpoint)
        raw = b'{"v":1,"id":"i","cmd":"config.set","args":{"key":"memory.budget_mb",' \
              b'"value":1e999}}'
        assert _ask(sock, raw)["error"]["code"] == "INVALID_ARGS"
        sock.close()
        assert client.call("config.get")["value"] == before
        assert daemon.learner.batch_size == 16 and daemon.config.telemetry.interval_s == 0.2
        published = daemon.telemetry.snapshot()["counters"].get("telemetry_faults", 0)
        assert published == 0 and daemon._reporter.is_alive()
        assert client.call("config.set", {"key": "telemetry.interval_s", "value": 3600}
                           )["value"] == 3600
        assert client.call("config.get", {"key": "telemetry.interval_s"})["value"] == 3600


def _surgeond(*settings):
    args = [sys.executable, "-m", "daemon.cli", "run", "--set",
            "source.uri=synthetic://?width=32&height=32&fps=30", "--set", "threads=1"]
    for item in settings:
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_second_daemon_cannot_take_the_sockets_of_a_stopped_one():
    endpoint = "ipc://%s/control.sock" % os.environ["RUNTIME_DIRECTORY"]
    first = _surgeond("learner.enabled=false")
    try:
        assert ControlClient(endpoint, timeout_s=60, retries=1).call("ping")["pong"]
        first.send_signal(signal.SIGSTOP)            # cannot answer the second one's probe
        second = _surgeond("learner.enabled=false", "checkpoints.directory=%s/other"
                           % os.environ["STATE_DIRECTORY"])
        output = second.communicate(timeout=120)[0].decode()
        assert second.returncode != 0 and "already answers" in output, output[-2000:]
        first.send_signal(signal.SIGCONT)
        pid = ControlClient(endpoint, timeout_s=10, retries=1).call("ping")["pid"]
        assert pid == first.pid
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
        assert first.returncode == 0
    finally:
        for process in (first,):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()


def test_a_client_whose_key_is_refused_reports_unreachable_instead_of_hanging(tmp_path):
    """The daemon's authenticator drops a refused client's only peer, and a DEALER's send then
    blocks; the CI saw surgeonctl hang there until the test timed out."""
    import threading
    from zmq.auth.thread import ThreadAuthenticator
    from zmq.utils.monitor import recv_monitor_message

    from daemon.control.client import Unreachable

    context = zmq.Context.instance()
    server_public, server_secret = zmq.curve_keypair()
    stranger_public, stranger_secret = zmq.curve_keypair()
    (tmp_path / "allowed").mkdir()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(tmp_path / "allowed"))
    router = context.socket(zmq.ROUTER)
    router.curve_secretkey, router.curve_publickey, router.curve_server = \
        server_secret, server_public, True
    endpoint = "tcp://127.0.0.1:%d" % router.bind_to_random_port("tcp://127.0.0.1")

    class RefusedBeforeSend(ControlClient):
        """Connects, then waits for the refusal, so the send comes after it every time."""
        def _socket(self, kind):
            sock = super()._socket(kind)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            connect = sock.connect

            def connect_and_wait(address):
                connect(address)
                assert monitor.poll(10000), "the daemon never refused the handshake"
                recv_monitor_message(monitor)
                sock.disable_monitor()
                monitor.close()
            sock.connect = connect_and_wait
            return sock

    outcome = []

    def ask():
        client = RefusedBeforeSend(endpoint, timeout_s=0.5, retries=2,
                                   curve=(server_public, stranger_public, stranger_secret))
        try:
            client.call("ping")
        except Unreachable as exc:
            outcome.append(exc)
    asker = threading.Thread(target=ask, daemon=True)
    try:
        asker.start()
        asker.join(20)
        assert not asker.is_alive(), "the client hangs in send"
        assert outcome and "after 2 tries" in str(outcome[0])
    finally:
        router.close()
        auth.stop()
