"""The control plane's thread: one ROUTER for requests, one PUB for telemetry and events.

NOTE [Control threads]
ZMQ sockets are not thread-safe, so the control thread owns both sockets. It handles at most
``control.max_requests_per_s`` requests a second: parsing is Python, and a flood handled at full
speed holds the GIL often enough to multiply serving latency (measured: p99 x5 at 9,500 bad
requests/s, BENCHMARKS.md). The excess waits in ZMQ's queues, which are fair between clients.
Other threads hand it messages to publish through a bounded queue (full: the message is dropped
and counted, never waited on). Short commands run on the control thread; long ones (checkpoint
save and load, reset) run one at a time on a job thread so that a slow disk or a learner step
in progress never delays pings or telemetry. The reply to a long command is sent when the job
finishes (ROUTER replies may go out in any order), or at once as ``accepted`` with a ``job`` id
when the request asked for ``"mode": "accept"``; completion is always published as
``event.job``.

A retried request (same client identity and ``id``, e.g. surgeonctl's lazy-pirate retry after
a timeout, which keeps its routing id) gets the cached reply, or joins the job already running,
so it never runs twice. The cache is per client, and an id reused for a different request is
refused, so no client is ever answered with another's reply or another command's.

NOTE [A control plane that stays up]
No message may stop the control thread: JSON is parsed strictly and at most MAX_DEPTH deep
(protocol.load_json), messages are read part by part and parts beyond the fourth dropped,
anything a handler raises becomes an INTERNAL reply, and anything else the loop raises is
logged and counted while the loop goes on. Should the thread end anyway, ``ensure_running``
(called by the serving loop) starts it again, and ``health`` says so. Connections are capped
per socket (connections.py) so that idle peers cannot use up the descriptors other threads
need.
"""

import collections
import hashlib
import logging
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import zmq

from surgeon_core.errors import SurgeonError

from .commands import COMMANDS, argument_models
from .connections import ConnectionCap
from .protocol import (ErrorCode, ProtocolError, build_union, encode, error_reply, ok_reply,
                       parse_request, request_id)
from .security import bind_endpoint, load_server_cert, require_safe_endpoint

__all__ = ["ControlServer", "ControlError", "endpoints_for"]

log = logging.getLogger("surgeond.control")
HARD_LIMIT_FACTOR = 16      # libzmq drops (and disconnects) beyond this many times the limit
JOB_QUEUE = 8
PUBLISH_QUEUE = 10_000
REPLY_CACHE = 512
MAX_FRAMES = 4              # identity, empty delimiter, payload: one more is already wrong


class ControlError(SurgeonError):
    """The control plane cannot start (endpoint taken, forbidden, or keys unreadable)."""


def endpoints_for(config) -> Tuple[str, str]:
    from .security import default_runtime_dir

    runtime = config.runtime_dir or str(default_runtime_dir())
    return (config.endpoint or "ipc://%s/control.sock" % runtime,
            config.pub_endpoint or "ipc://%s/telemetry.sock" % runtime)


class _QuietLog:
    """Logs the first bad request of each ``period`` s and how many followed, never more."""

    def __init__(self, period: float = 60.0):
        self.period, self._next, self._muted = period, 0.0, 0

    def bad(self, code: str, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._muted += 1
            return
        extra = " (%d more since the last report)" % self._muted if self._muted else ""
        log.warning("bad control request: %s: %s%s", code, message[:200], extra)
        self._next, self._muted = now + self.period, 0


class _TokenBucket:
    """``rate`` requests a second, in bursts of at most ``burst``; the rest wait in ZMQ's
    queue (fair-queued between clients, so one flooding client cannot starve another)."""

    def __init__(self, rate: float, burst: int = 32):
        self.rate, self.burst = rate, burst
        self._tokens, self._last = float(burst), time.monotonic()

    def left(self) -> int:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return int(self._tokens)

    def spend(self, n: int) -> None:
        self._tokens -= n


class ControlServer:
    """Binds on ``start`` (so a taken or forbidden endpoint fails the daemon's start) and
    serves until ``stop``.

    Args:
        config: ControlConfig.
        ops: daemon.operations.Operations, what the commands act on.
        telemetry: counters for requests and errors.
    """

    def __init__(self, config, ops, telemetry):
        self.config, self.ops, self.telemetry = config, ops, telemetry
        self.endpoint, self.pub_endpoint = endpoints_for(config)
        self._adapter = build_union(argument_models())
        self._context = zmq.Context()
        self._auth = None
        self._router: Optional[zmq.Socket] = None
        self._pub: Optional[zmq.Socket] = None
        self._outbox: "queue.Queue[Tuple[str, Dict]]" = queue.Queue(PUBLISH_QUEUE)
        self._jobs: "queue.Queue[Optional[Tuple]]" = queue.Queue(JOB_QUEUE)
        self._done: "queue.Queue[Tuple]" = queue.Queue()
        # (client identity, id) -> (request digest, envelopes waiting) / (digest, reply)
        self._inflight: Dict[Tuple[bytes, str], Tuple[str, List[List[bytes]]]] = {}
        self._replies: "collections.OrderedDict[Tuple[bytes, str], Tuple[str, bytes]]" = \
            collections.OrderedDict()
        self._caps: List[ConnectionCap] = []
        self._endpoint_lock = None
        self.faults = 0
        self.restarts = 0
        self.last_fault: Optional[str] = None
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._quiet = _QuietLog()
        self._rate = _TokenBucket(config.max_requests_per_s)
        self.dropped_publishes = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "ControlServer":
        try:
            self._bind()
        except (zmq.ZMQError, OSError, ValueError, ControlError) as exc:
            self._close_sockets()
            self._release_endpoint()
            if self._auth is not None:
                self._auth.stop()
            self._context.term()
            raise ControlError("control socket %s: %s" % (self.endpoint, exc)) from None
        self._threads = [self._thread(self._serve, "control"),
                         self._thread(self._work, "control-jobs")]
        log.info("control on %s, telemetry on %s%s", self.endpoint, self.pub_endpoint,
                 " (CURVE)" if self._auth else "")
        for endpoint in (self.endpoint, self.pub_endpoint):
            if endpoint.startswith("tcp://") and self._auth is None:
                log.warning("%s is TCP without CURVE: any local user can control this daemon "
                            "(the default ipc:// socket is private to its user)", endpoint)
        return self

    @staticmethod
    def _thread(target, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def ensure_running(self) -> bool:
        """Start again a control thread that ended (it should not); True when one was."""
        targets = (self._serve, self._work)
        restarted = False
        for index, thread in enumerate(self._threads):
            if not thread.is_alive() and not self._stop.is_set():
                log.error("control thread %s had stopped; started again", thread.name)
                self._threads[index] = self._thread(targets[index], thread.name)
                self.restarts += 1
                self.telemetry.count("control_restarts")
                restarted = True
        return restarted

    def health(self) -> Dict[str, Any]:
        alive = all(thread.is_alive() for thread in self._threads)
        return {"state": "ok" if alive and not self.restarts else
                "restarted" if alive else "down",
                "faults": self.faults, "restarts": self.restarts, "last_fault": self.last_fault,
                "connections": {cap.name: len(cap.open) for cap in self._caps},
                "refused_connections": sum(cap.refused for cap in self._caps)}

    def _bind(self) -> None:
        access = self.config.socket_access
        self._lock_endpoint(access)
        self._refuse_if_answered()
        self._router = self._context.socket(zmq.ROUTER)
        self._pub = self._context.socket(zmq.PUB)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes *
                                HARD_LIMIT_FACTOR)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a retrying client may reuse its id
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 500)
        self._pub.setsockopt(zmq.SNDHWM, 1000)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)     # a peer that never speaks ZMTP
            sock.setsockopt(zmq.HEARTBEAT_IVL, 10000)    # and one that went silent
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
        curve = bool(self.config.curve_server_cert)
        for endpoint in (self.endpoint, self.pub_endpoint):
            require_safe_endpoint(endpoint, curve)        # the rule config --check applies
        if curve:
            self._enable_curve()
        bind_endpoint(self._router, self.endpoint, access)
        bind_endpoint(self._pub, self.pub_endpoint, access)
        limit = self.config.max_connections
        self._caps = [ConnectionCap(self._router, limit, "control"),
                      ConnectionCap(self._pub, limit, "telemetry")]

    def _lock_endpoint(self, access: str) -> None:
        """An flock beside the ipc socket: a second daemon is refused even while the first
        is stopped (SIGSTOP) and cannot answer the ping below."""
        from ..safefiles import DirectoryLock, LockHeld
        from .security import ipc_path, prepare_ipc

        path = ipc_path(self.endpoint)
        if path is None:
            return                  # TCP: bind itself fails on a port in use
        prepare_ipc(path, access)
        try:
            self._endpoint_lock = DirectoryLock(path.with_name(path.name + ".lock"))
        except LockHeld as exc:
            raise ControlError("another daemon already answers on %s (%s)"
                               % (self.endpoint, exc.strerror)) from None

    def _refuse_if_answered(self) -> None:
        """Binding an ipc path another daemon listens on would silently steal its socket."""
        from .security import ipc_path

        path = ipc_path(self.endpoint)
        if path is None or not path.exists():
            return
        probe = self._context.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        # a send that cannot leave means a listener refused the handshake: a daemon is there too
        probe.setsockopt(zmq.SNDTIMEO, 300)
        try:
            probe.connect(self.endpoint)
            probe.send(encode({"v": 1, "id": "probe", "cmd": "ping"}))
            answered = probe.poll(300)
        except zmq.Again:
            answered = True
        finally:
            probe.close()
        if answered:
            raise ControlError("another daemon already answers on %s" % self.endpoint)

    def _enable_curve(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_server_cert(self.config.curve_server_cert)
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        clients = self.config.curve_clients_dir
        self._auth.configure_curve(domain="*", location=clients if clients else
                                   zmq.auth.CURVE_ALLOW_ANY)
        for sock in (self._router, self._pub):
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        for thread in self._threads:
            thread.join(timeout)
        self._close_sockets()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()
        self._remove_ipc_files()
        self._release_endpoint()

    def _release_endpoint(self) -> None:
        if self._endpoint_lock is not None:
            self._endpoint_lock.release()
            self._endpoint_lock = None

    def _close_sockets(self) -> None:
        for cap in self._caps:
            cap.close()
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close()

    def _remove_ipc_files(self) -> None:
        from .security import ipc_path

        for endpoint in (self.endpoint, self.pub_endpoint):
            path = ipc_path(endpoint)
            if path is not None and path.is_socket():
                path.unlink()

    # -- publishing (any thread) ---------------------------------------------------------
    def publish(self, topic: str, payload: Dict[str, Any]) -> None:
        try:
            self._outbox.put_nowait((topic, payload))
        except queue.Full:
            self.dropped_publishes += 1

    def on_event(self, name: str, payload: Dict[str, Any]) -> None:
        self.publish("event." + name, payload)

    # -- the control thread --------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        for cap in self._caps:
            poller.register(cap.monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._serve_once(poller)
            except Exception as exc:  # noqa: BLE001 - see NOTE [A control plane that stays up]
                self._fault("control loop", exc)
                self._stop.wait(0.05)
        self._send_finished_jobs()
        self._flush_outbox()

    def _serve_once(self, poller: zmq.Poller) -> None:
        left = self._rate.left()
        if left <= 0:
            self._stop.wait(0.005)
        else:
            ready = dict(poller.poll(20))
            for cap in self._caps:
                if ready.get(cap.monitor):
                    cap.handle()
            if ready.get(self._router):
                self._receive_burst(left)
        self._send_finished_jobs()
        self._flush_outbox()

    def _fault(self, where: str, exc: BaseException) -> None:
        self.faults += 1
        self.last_fault = "%s: %s: %s" % (where, type(exc).__name__, str(exc)[:200])
        self.telemetry.count("control_faults")
        log.error("%s", self.last_fault, exc_info=exc if self.faults <= 10 else None)

    def _receive_burst(self, limit: int) -> None:
        for _ in range(limit):
            try:
                frames = self._receive()
            except zmq.Again:
                return
            self._rate.spend(1)
            try:
                self._handle(frames)
            except Exception as exc:  # noqa: BLE001 - see NOTE [A control plane that stays up]
                self._fault("request", exc)
                self._send(frames[:1], encode(error_reply(None, ErrorCode.INTERNAL,
                                                          "the request failed: %s"
                                                          % type(exc).__name__)))

    def _receive(self) -> List[bytes]:
        """One message, part by part: parts beyond MAX_FRAMES are read and dropped."""
        frames = [self._router.recv(zmq.NOBLOCK)]
        while self._router.getsockopt(zmq.RCVMORE):
            part = self._router.recv()
            if len(frames) < MAX_FRAMES:
                frames.append(part)
        return frames

    def _handle(self, frames: List[bytes]) -> None:
        """[identity, (empty,) payload]: DEALER and REQ clients alike."""
        self.telemetry.count("control_requests")
        envelope, payload = frames[:-1], frames[-1]
        if len(frames) < 2 or len(frames) > 3 or (len(frames) == 3 and frames[1] != b""):
            self._fail(frames[:1] + ([b""] if len(frames) > 2 else []), None,
                       ErrorCode.BAD_REQUEST, "one JSON frame per request")
            return
        if len(payload) > self.config.max_message_bytes:
            self._fail(envelope, None, ErrorCode.TOO_LARGE, "request of %d bytes over the %d "
                       "byte limit" % (len(payload), self.config.max_message_bytes))
            return
        try:
            request = parse_request(payload, self._adapter, COMMANDS)
        except ProtocolError as exc:
            self._fail(envelope, request_id(payload), exc.code, exc.message)
            return
        self._dispatch(envelope, request)

    def _dispatch(self, envelope: List[bytes], request) -> None:
        rid, key, digest = request.id, (envelope[0], request.id), _digest(request)
        seen = self._replies.get(key) or self._inflight.get(key)
        if seen is not None and seen[0] != digest:
            self._fail(envelope, rid, ErrorCode.BAD_REQUEST, "id %r was already used for "
                       "another request: use a new id for each request" % rid)
            return
        if key in self._replies:
            self._send(envelope, self._replies[key][1])
            return
        if key in self._inflight:           # a retry of a job still running: answer both
            self._inflight[key][1].append(envelope)
            return
        module = COMMANDS[request.cmd]
        if not module.LONG:
            self._reply(envelope, key, digest, *self._execute(module, request.args))
            return
        waiting = [envelope] if request.mode == "wait" else []
        try:
            self._jobs.put_nowait((key, digest, request.cmd, module, request.args))
        except queue.Full:
            self._fail(envelope, rid, ErrorCode.BUSY, "%d operations already queued; try again"
                       % JOB_QUEUE)
            return
        self._inflight[key] = (digest, waiting)
        if not waiting:
            self._send(envelope, encode(ok_reply(rid, {"accepted": True, "job": rid,
                                                       "cmd": request.cmd})))

    def _execute(self, module, args) -> Tuple[bool, Dict[str, Any]]:
        from ..checkpoints import CheckpointError
        from ..config import ConfigError
        from ..operations import OperationError

        try:
            return True, module.run(self.ops, args)
        except (OperationError, CheckpointError) as exc:
            return False, {"code": exc.code, "message": str(exc)}
        except ConfigError as exc:
            return False, {"code": ErrorCode.INVALID_ARGS, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failing command must not stop the plane
            log.exception("command %s failed", module.NAME)
            return False, {"code": ErrorCode.INTERNAL, "message": "%s: %s"
                           % (type(exc).__name__, exc)}

    def _reply(self, envelope: List[bytes], key: Tuple[bytes, str], digest: str, ok: bool,
               body: Dict[str, Any]) -> None:
        message = self._result_message(key[1], ok, body)
        self._remember(key, digest, message)
        self._send(envelope, message)

    def _result_message(self, rid: str, ok: bool, body: Dict[str, Any]) -> bytes:
        if ok:
            return encode(ok_reply(rid, body))
        self.telemetry.count("control_errors")
        return encode(error_reply(rid, body["code"], body["message"]))

    def _fail(self, envelope: List[bytes], rid: Optional[str], code: str, message: str) -> None:
        self.telemetry.count("control_errors")
        self._quiet.bad(code, message)
        self._send(envelope, encode(error_reply(rid, code, message)))

    def _remember(self, key: Tuple[bytes, str], digest: str, message: bytes) -> None:
        self._replies[key] = (digest, message)
        while len(self._replies) > REPLY_CACHE:
            self._replies.popitem(last=False)

    def _send(self, envelope: List[bytes], message: bytes) -> None:
        try:
            self._router.send_multipart(envelope + [message], zmq.NOBLOCK)
        except zmq.ZMQError:   # the client went away (or its queue is full): nothing to do
            self.telemetry.count("control_unsent")

    def _send_finished_jobs(self) -> None:
        while True:
            try:
                key, digest, cmd, ok, body = self._done.get_nowait()
            except queue.Empty:
                return
            message = self._result_message(key[1], ok, body)
            for envelope in self._inflight.pop(key, (digest, []))[1]:
                self._send(envelope, message)
            self._remember(key, digest, message)
            self._publish_now("event.job", {"event": "job", "job": key[1], "cmd": cmd, "ok": ok,
                                            ("result" if ok else "error"): body,
                                            "time": time.time()})

    def _flush_outbox(self, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                topic, payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._publish_now(topic, payload)

    def _publish_now(self, topic: str, payload: Dict[str, Any]) -> None:
        try:
            self._pub.send_multipart([topic.encode(), encode(payload)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped_publishes += 1

    # -- the job thread ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            key, digest, cmd, module, args = job
            ok, body = self._execute(module, args)
            self._done.put((key, digest, cmd, ok, body))


def _digest(request) -> str:
    """What a request asks for, so that a reused id is told apart from a retry."""
    text = request.cmd + "\n" + request.args.model_dump_json() + "\n" + request.mode
    return hashlib.sha256(text.encode()).hexdigest()
