"""How surgeond's log lines look: plain text, one JSON object per line (`log_format: json`, for
log shippers), and under systemd the sd-daemon priority prefix on each line, so that journald
files warnings as warnings (`journalctl -u surgeond -p warning`)."""

import json
import logging
import os
import sys
import time
from typing import Optional, TextIO

__all__ = ["configure_logging", "JsonFormatter", "JournalFormatter", "writes_to_journal",
           "LOG_FORMATS"]

LOG_FORMATS = ("text", "json")
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    return next((p for level, p in sorted(_PRIORITY.items(), reverse=True) if levelno >= level), 7)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + ".%03dZ" % record.msecs, "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Each line of a record (tracebacks too) led by the record's priority; no timestamp, which
    journald adds itself."""

    def __init__(self, inner: Optional[logging.Formatter] = None):
        super().__init__()
        self.inner = inner or logging.Formatter("%(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % _priority(record.levelno)
        return "\n".join(prefix + line for line in self.inner.format(record).splitlines())


def writes_to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd named in $JOURNAL_STREAM."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in wanted.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(log_format: str = "text", level: str = "INFO",
                      stream: Optional[TextIO] = None) -> logging.Handler:
    """One handler on the root logger, writing ``log_format`` to ``stream`` (stderr)."""
    if log_format not in LOG_FORMATS:
        raise ValueError("log_format must be one of %s, got %r" % (LOG_FORMATS, log_format))
    stream = stream or sys.stderr
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else \
        logging.Formatter(TEXT)
    if log_format == "text" and writes_to_journal(stream):
        formatter = JournalFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
