import json

import pytest

from daemon.control.commands import COMMANDS, argument_models
from daemon.control.protocol import (ErrorCode, ProtocolError, build_union, parse_request,
                                     request_id)
from daemon.control.security import require_safe_endpoint

ADAPTER = build_union(argument_models())


def _parse(body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, ADAPTER, COMMANDS)


def test_valid_requests_parse_to_their_command():
    request = _parse({"v": 1, "id": "a", "cmd": "checkpoint.save", "args": {"name": "x"}})
    assert request.cmd == "checkpoint.save" and request.args.name == "x"
    assert request.mode == "wait"
    assert _parse({"v": 1, "id": "b", "cmd": "ping"}).args is not None


@pytest.mark.parametrize("body, code", [
    (b"\xff\xfe", ErrorCode.BAD_JSON),
    (b"{not json", ErrorCode.BAD_JSON),
    ([1, 2], ErrorCode.BAD_JSON),
    ({"id": "a", "cmd": "ping"}, ErrorCode.UNSUPPORTED_VERSION),
    ({"v": 2, "id": "a", "cmd": "ping"}, ErrorCode.UNSUPPORTED_VERSION),
    ({"v": True, "id": "a", "cmd": "ping"}, ErrorCode.UNSUPPORTED_VERSION),
    ({"v": 1, "id": "a", "cmd": 5}, ErrorCode.BAD_REQUEST),
    ({"v": 1, "id": "a", "cmd": "format.disk"}, ErrorCode.UNKNOWN_COMMAND),
    ({"v": 1, "id": 7, "cmd": "ping"}, ErrorCode.BAD_REQUEST),
    ({"v": 1, "id": "x" * 129, "cmd": "ping"}, ErrorCode.BAD_REQUEST),
    ({"v": 1, "id": "a", "cmd": "ping", "extra": 1}, ErrorCode.BAD_REQUEST),
    ({"v": 1, "id": "a", "cmd": "ping", "mode": "later"}, ErrorCode.BAD_REQUEST),
    ({"v": 1, "id": "a", "cmd": "ping", "args": {"x": 1}}, ErrorCode.INVALID_ARGS),
    ({"v": 1, "id": "a", "cmd": "budget.set", "args": {"mb": "lots"}}, ErrorCode.INVALID_ARGS),
    ({"v": 1, "id": "a", "cmd": "budget.set", "args": {"mb": -3}}, ErrorCode.INVALID_ARGS),
    ({"v": 1, "id": "a", "cmd": "budget.set", "args": {}}, ErrorCode.INVALID_ARGS),
    ({"v": 1, "id": "a", "cmd": "checkpoint.load", "args": {"name": ["x"]}},
     ErrorCode.INVALID_ARGS),
])
def test_bad_requests_get_the_most_specific_code(body, code):
    with pytest.raises(ProtocolError) as caught:
        _parse(body)
    assert caught.value.code == code, caught.value.message


def test_the_id_of_a_bad_request_is_echoed_when_readable():
    assert request_id(b'{"id": "q1", "cmd": 3}') == "q1"
    assert request_id(b"garbage") is None and request_id(b"[1]") is None


def test_every_command_has_help_and_a_kind():
    for name, module in COMMANDS.items():
        assert module.__doc__ and module.__doc__.startswith(name.split()[0]), name
        assert isinstance(module.LONG, bool)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://localhost:5555",
                                      "tcp://[::1]:5555", "ipc:///run/surgeon/control.sock"])
def test_local_endpoints_are_allowed_without_curve(endpoint):
    require_safe_endpoint(endpoint, curve=False)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555",
                                      "tcp://192.168.1.20:5555"])
def test_open_tcp_needs_curve(endpoint):
    with pytest.raises(ValueError, match="without CURVE"):
        require_safe_endpoint(endpoint, curve=False)
    require_safe_endpoint(endpoint, curve=True)


@pytest.mark.parametrize("endpoint", ["udp://x:1", "ipc://relative.sock", "ipc:///" + "a" * 120])
def test_odd_endpoints_are_refused(endpoint):
    with pytest.raises(ValueError):
        require_safe_endpoint(endpoint, curve=False)


def test_the_protocol_document_covers_every_command_code_and_live_key():
    from pathlib import Path

    from daemon.operations import LIVE_KEYS

    text = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text()
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    for word in list(COMMANDS) + codes + list(LIVE_KEYS):
        assert "`%s`" % word in text, word
