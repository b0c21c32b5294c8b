"""systemd's notify protocol (sd_notify(3)) in the standard library: readiness, status, watchdog.

Messages are datagrams on the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means
the abstract namespace). Without that variable every call is a silent no-op, so the daemon runs
the same under systemd, in Docker and in a shell. ``WATCHDOG_USEC`` (set by ``WatchdogSec=``) is
honoured only when ``WATCHDOG_PID`` is unset or names this process, as sd_watchdog_enabled(3)
says.
"""

import logging
import os
import socket
from typing import Mapping, Optional

__all__ = ["Notifier"]

log = logging.getLogger("surgeond.systemd")


class Notifier:
    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: Optional[str] = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_s = self._watchdog_seconds(env)
        self._sock: Optional[socket.socket] = None

    @staticmethod
    def _watchdog_seconds(env: Mapping[str, str]) -> Optional[float]:
        pid, usec = env.get("WATCHDOG_PID"), env.get("WATCHDOG_USEC")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False (and a debug line) if it cannot go."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", fields, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *(["STATUS=" + status] if status else []))

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_start(self, seconds: float) -> bool:
        """Ask for more start-up time (model load on a cold Xavier NX can take minutes)."""
        return self.send("EXTEND_TIMEOUT_USEC=%d" % int(seconds * 1e6))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
