"""A client of the control plane: requests with timeout and retry, and the PUB stream.

Requests follow the ZMQ guide's lazy pirate pattern: a DEALER sends, polls for the reply for
``timeout_s`` and, when none comes, closes the socket (dropping what it queued) and tries again
on a fresh one, up to ``retries`` times. Every try carries the same request id, and the daemon
answers a repeated id from its reply cache, so a retry never runs a command twice. Every try
carries the same routing id too, since that cache is kept per client.

The send has the same deadline as the reply. A DEALER's send blocks while it has no peer, and a
daemon's CURVE authenticator that refuses this client's key removes the peer: a client with a
revoked key would otherwise hang in send for good rather than report the daemon unreachable.
"""

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import zmq

from .protocol import PROTOCOL_VERSION
from .security import default_runtime_dir, load_client_cert

__all__ = ["ControlClient", "DaemonError", "Unreachable", "BadReply", "find_endpoint",
           "CurveKeys"]

CurveKeys = Tuple[bytes, bytes, bytes]   # server public, client public, client secret


class DaemonError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str):
        super().__init__("%s: %s" % (code, message))
        self.code, self.message = code, message


class Unreachable(Exception):
    """No reply after every retry (or no peer to send to: wrong CURVE keys look the same)."""


class BadReply(Exception):
    """A reply that is not protocol v1 JSON."""


def find_endpoint() -> str:
    """$SURGEON_ENDPOINT, else the first control socket that exists where daemons put them."""
    explicit = os.environ.get("SURGEON_ENDPOINT")
    if explicit:
        return explicit
    candidates = [default_runtime_dir() / "control.sock", Path("/run/surgeon/control.sock")]
    for path in candidates:
        if path.exists():
            return "ipc://%s" % path
    return "ipc://%s" % candidates[0]


def curve_keys(server_cert: Optional[str], client_cert: Optional[str]) -> Optional[CurveKeys]:
    if not server_cert:
        return None
    import zmq.auth

    try:
        server_public, _ = zmq.auth.load_certificate(server_cert)
    except (OSError, ValueError) as exc:
        raise ValueError("cannot read the server's certificate %s: %s" % (server_cert, exc)) \
            from None
    public, secret = load_client_cert(client_cert)
    return server_public, public, secret


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 5.0, retries: int = 3,
                 curve: Optional[CurveKeys] = None):
        self.endpoint, self.timeout_s, self.retries = endpoint, timeout_s, retries
        self.curve = curve
        self._context = zmq.Context.instance()
        # one routing id for every try: the daemon's reply cache is per client
        self._identity = b"surgeonctl-" + uuid.uuid4().bytes

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.ROUTING_ID, self._identity)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        return sock

    def request(self, cmd: str, args: Optional[Dict[str, Any]] = None,
                timeout_s: Optional[float] = None, mode: str = "wait") -> Dict[str, Any]:
        """The whole reply of a successful command; DaemonError, Unreachable or BadReply."""
        rid = uuid.uuid4().hex
        message = json.dumps({"v": PROTOCOL_VERSION, "id": rid, "cmd": cmd, "args": args or {},
                              "mode": mode}).encode()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for _ in range(max(1, self.retries)):
            reply = self._try(message, rid, timeout)
            if reply is not None:
                return self._check(reply)
        raise Unreachable("no reply from %s after %d tries of %.1f s"
                          % (self.endpoint, max(1, self.retries), timeout))

    def call(self, cmd: str, args: Optional[Dict[str, Any]] = None, **kwargs) -> Dict[str, Any]:
        return self.request(cmd, args, **kwargs)["result"]

    def _try(self, message: bytes, rid: str, timeout: float) -> Optional[Dict[str, Any]]:
        sock = self._socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
            sock.connect(self.endpoint)
            deadline = time.monotonic() + timeout
            try:
                sock.send(message)
            except zmq.Again:
                return None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000)):
                    return None
                reply = _decode(sock.recv())
                if reply.get("id") == rid:
                    return reply
        finally:
            sock.close()

    @staticmethod
    def _check(reply: Dict[str, Any]) -> Dict[str, Any]:
        if reply.get("v") != PROTOCOL_VERSION:
            raise BadReply("reply in protocol v%r, this client speaks v%d"
                           % (reply.get("v"), PROTOCOL_VERSION))
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise DaemonError(str(error.get("code", "UNKNOWN")), str(error.get("message", "")))
        return reply

    def subscribe(self, endpoint: str, topics: List[str],
                  idle_timeout_s: Optional[float] = None) -> Iterator[Tuple[str, Dict]]:
        """(topic, message) from the PUB socket; Unreachable after ``idle_timeout_s`` silent."""
        sock = self._socket(zmq.SUB)
        try:
            sock.connect(endpoint)
            for topic in topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            while True:
                wait = None if idle_timeout_s is None else int(idle_timeout_s * 1000)
                if not sock.poll(wait):
                    raise Unreachable("nothing from %s for %.1f s" % (endpoint, idle_timeout_s))
                frames = sock.recv_multipart()
                if len(frames) == 2:
                    yield frames[0].decode("utf-8", "replace"), _decode(frames[1])
        finally:
            sock.close()


def _decode(raw: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReply("reply is not JSON: %s" % exc) from None
    if not isinstance(value, dict):
        raise BadReply("reply is not a JSON object")
    return value
