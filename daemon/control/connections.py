"""A cap on the connections a listening ZMQ socket holds.

libzmq accepts every connection and has no per-socket limit, so a few hundred idle connections
(loopback TCP needs no key) use up the process's file descriptors, and then the learner cannot
open /proc/meminfo nor the store a checkpoint. The socket's monitor reports each accepted
connection with its descriptor; one over the cap is shut down (``shutdown(2)`` on a duplicate
of the descriptor), after which libzmq sees the peer gone and closes its own copy, so libzmq
never operates on a descriptor closed behind its back. Before shutting one down its local
address is compared with the listener's, so a descriptor number reused in between is never
touched.
"""

import logging
import os
import socket
from typing import Optional, Set

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["ConnectionCap"]

log = logging.getLogger("surgeond.control")
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class ConnectionCap:
    """Watches ``sock`` (bound to ``endpoint``) and keeps at most ``limit`` connections.

    ``monitor`` is the PAIR socket to poll; call ``handle`` when it is readable. Only the
    thread that owns ``sock`` may use this object.
    """

    def __init__(self, sock: zmq.Socket, limit: int, name: str):
        self.limit, self.name = limit, name
        self.open: Set[int] = set()
        self.refused = 0
        self._sock = sock
        self.monitor = sock.get_monitor_socket(_EVENTS)
        self._warned = False

    def handle(self, budget: int = 256) -> None:
        """Process up to ``budget`` queued events."""
        for _ in range(budget):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd, event["endpoint"])
            else:
                self.open.discard(fd)
                self._warned = self._warned and len(self.open) > self.limit // 2

    def _accepted(self, fd: int, endpoint: bytes) -> None:
        if len(self.open) < self.limit:
            self.open.add(fd)
            return
        if _drop(fd, endpoint.decode("utf-8", "replace")):
            self.refused += 1
            if not self._warned:
                log.warning("%s: %d connections open, the limit (control.max_connections); "
                            "newer ones are closed", self.name, self.limit)
                self._warned = True

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)


def _drop(fd: int, endpoint: str) -> bool:
    """Shut the connection on ``fd`` down if it still is one accepted on ``endpoint``."""
    try:
        peer = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False          # already closed: nothing to drop
    try:
        if not _same_listener(peer.getsockname(), endpoint):
            return False
        peer.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        peer.close()


def _same_listener(local, endpoint: str) -> bool:
    """An accepted socket's local address is its listener's: compare with the endpoint."""
    if endpoint.startswith("ipc://"):
        path = local.decode() if isinstance(local, bytes) else local
        return path == endpoint[len("ipc://"):]
    if endpoint.startswith("tcp://") and isinstance(local, tuple):
        port: Optional[str] = endpoint.rsplit(":", 1)[-1]
        return str(local[1]) == port
    return False
