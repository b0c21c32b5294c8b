"""Who may talk to the daemon: endpoint rules, ipc socket permissions, CURVE keys.

The defaults follow ../shared/research/jetson.md section 6.4: ``ipc://`` sockets in a runtime
directory only the service user (or its group) can enter, TCP only on loopback unless CURVE
encrypts and authenticates the link. A socket file's mode follows the umask at ``bind()``, so
the bind runs under a tight umask and the mode is set again afterwards; the umask is
process-wide, hence the lock.
"""

import ipaddress
import os
import stat
import threading
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["require_safe_endpoint", "default_runtime_dir", "ipc_path", "prepare_ipc",
           "bind_endpoint", "load_server_cert", "load_client_cert", "make_certificates",
           "IPC_PATH_MAX"]

IPC_PATH_MAX = 107          # sockaddr_un.sun_path minus the terminating NUL on Linux
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")
_UMASK_LOCK = threading.Lock()
MODES = {"owner": (0o700, 0o600, 0o177), "group": (0o750, 0o660, 0o117)}  # dir, socket, umask


def _tcp_host(endpoint: str) -> str:
    rest = endpoint.split("://", 1)[1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # '*', '0.0.0.0' is handled above as an address; interface names land here


def require_safe_endpoint(endpoint: str, curve: bool) -> None:
    """Refuse endpoints that would listen beyond this machine without CURVE, and odd ones."""
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    if scheme not in ("ipc", "tcp"):
        raise ValueError("endpoint %r: use ipc:///path or tcp://host:port" % endpoint)
    if scheme == "ipc":
        path = endpoint[len("ipc://"):]
        if not path.startswith("/"):
            raise ValueError("endpoint %r: ipc paths must be absolute" % endpoint)
        if len(path.encode()) > IPC_PATH_MAX:
            raise ValueError("endpoint %r: ipc path longer than %d bytes" % (endpoint,
                                                                            IPC_PATH_MAX))
        return
    if not curve and not _is_loopback(_tcp_host(endpoint)):
        raise ValueError("endpoint %s listens beyond this machine without CURVE: bind to "
                         "127.0.0.1 or set control.curve_server_cert" % endpoint)


def default_runtime_dir() -> Path:
    """systemd's RuntimeDirectory, else the user's runtime directory, else one in /tmp."""
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "surgeon"
    return Path("/tmp/surgeon-%d" % os.getuid())


def ipc_path(endpoint: str) -> Optional[Path]:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def prepare_ipc(path: Path, access: str) -> None:
    """Create the socket's directory private to us; refuse one another user controls."""
    dir_mode = MODES[access][0]
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid not in (os.getuid(), 0):
        raise PermissionError("%s belongs to uid %d, not to this user (%d): another user could "
                              "replace the control socket" % (path.parent, info.st_uid,
                                                              os.getuid()))
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise PermissionError("%s is writable by everyone: use a private runtime directory"
                              % path.parent)


def bind_endpoint(socket, endpoint: str, access: str) -> None:
    """Bind, with the ipc socket file owner-only (or owner+group) from its first instant."""
    path = ipc_path(endpoint)
    if path is None:
        socket.bind(endpoint)
        return
    prepare_ipc(path, access)
    _, sock_mode, umask = MODES[access]
    with _UMASK_LOCK:
        old = os.umask(umask)
        try:
            socket.bind(endpoint)
        finally:
            os.umask(old)
    os.chmod(path, sock_mode)


def make_certificates(directory: Path, name: str) -> Tuple[Path, Path]:
    """(public, secret) certificate files; the secret one readable by its owner only."""
    import zmq.auth

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load(path: str, need_secret: bool) -> Tuple[bytes, Optional[bytes]]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError("cannot read CURVE certificate %s: %s" % (path, exc)) from None
    if need_secret and not secret:
        raise ValueError("%s holds no secret key: give the .key_secret file" % path)
    return public, secret


def load_server_cert(path: str) -> Tuple[bytes, bytes]:
    return _load(path, need_secret=True)


def load_client_cert(path: Optional[str]) -> Tuple[bytes, bytes]:
    """The client's own key pair: from its certificate, or a fresh one (servers that accept
    any client only check that it knows the server's public key)."""
    if path is None:
        import zmq

        return zmq.curve_keypair()
    return _load(path, need_secret=True)
