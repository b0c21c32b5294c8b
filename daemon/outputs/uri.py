"""Video output URIs (jetson-inference's videoOutput spelling), parsed and checked at config time.

- ``display://N``: a window on display N (``$DISPLAY`` when set);
- ``file:///path/out.mp4`` (``.mp4``, ``.mkv``, ``.avi``): an encoded video file;
- ``rtsp://@:8554/live``: an RTSP server the daemon runs (``@`` is every interface; give an
  address such as ``127.0.0.1`` to serve one);
- ``rtp://HOST:PORT``: H.264 over RTP/UDP to one receiver.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["OutputSpec", "parse_output_uri", "BadOutputUri", "FILE_SUFFIXES"]

FILE_SUFFIXES = (".mp4", ".mkv", ".avi")
_PATH_PART = re.compile(r"^/[A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*$")


class BadOutputUri(ValueError):
    """The URI names no output this daemon can make; the message says what would."""


@dataclass(frozen=True)
class OutputSpec:
    uri: str
    kind: str            # display, file, rtsp or rtp
    host: str = ""
    port: int = 0
    path: str = ""       # the file, or the RTSP mount point
    display: int = 0


def _port(text: str, uri: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadOutputUri("%s: the port must be 1-65535" % uri)
    return int(text)


def _host_port(netloc: str, uri: str, default_port: int = 0):
    host, sep, port = netloc.rpartition(":")
    if not sep:
        host, port = netloc, ""
    host = host.strip("[]")
    if not port:
        if not default_port:
            raise BadOutputUri("%s: give a port (HOST:PORT)" % uri)
        return host, default_port
    return host, _port(port, uri)


def parse_output_uri(uri: str) -> OutputSpec:
    """The spec of one ``output.video`` entry; raises BadOutputUri with the accepted forms."""
    text = uri.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise BadOutputUri("%r: expected display://N, file:///path.mp4, rtsp://@:PORT/PATH or "
                           "rtp://HOST:PORT" % uri)
    if scheme == "display":
        if not rest.isdigit():
            raise BadOutputUri("%s: the display is a number, e.g. display://0" % uri)
        return OutputSpec(text, "display", display=int(rest))
    if scheme == "file":
        return _file_spec(text, rest)
    if scheme == "rtsp":
        parts = urlsplit(text)
        host, port = _host_port(parts.netloc, text, 8554)
        mount = parts.path or "/live"
        if not _PATH_PART.match(mount):
            raise BadOutputUri("%s: the mount point is a path such as /live" % uri)
        return OutputSpec(text, "rtsp", host="0.0.0.0" if host in ("@", "") else host,
                          port=port, path=mount)
    if scheme == "rtp":
        host, port = _host_port(urlsplit(text).netloc, text)
        if not host:
            raise BadOutputUri("%s: give the receiver's address, rtp://HOST:PORT" % uri)
        return OutputSpec(text, "rtp", host=host, port=port)
    raise BadOutputUri("%s: unknown output scheme %r (display, file, rtsp, rtp)" % (uri, scheme))


def _file_spec(uri: str, rest: str) -> OutputSpec:
    path = Path(rest)
    if not rest.startswith("/"):
        raise BadOutputUri("%s: file outputs take an absolute path, file:///path/out.mp4" % uri)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise BadOutputUri("%s: the file must end in %s" % (uri, ", ".join(FILE_SUFFIXES)))
    return OutputSpec(uri, "file", path=str(path))
