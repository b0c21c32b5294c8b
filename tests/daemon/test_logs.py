"""Log lines: text, JSON, and journald's priority prefixes under systemd."""

import io
import json
import logging
import os

import pytest

from daemon.config import ConfigError, load_config
from daemon.logs import configure_logging


@pytest.fixture(autouse=True)
def _root_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_level_logger_message_and_exception():
    out = io.StringIO()
    configure_logging("json", stream=out)
    try:
        raise OSError("disk gone")
    except OSError:
        logging.getLogger("surgeond.test").warning("saving %s failed", "ckpt-1", exc_info=True)
    line = json.loads(out.getvalue())
    assert (line["level"], line["logger"], line["message"]) == (
        "WARNING", "surgeond.test", "saving ckpt-1 failed")
    assert "OSError: disk gone" in line["exception"] and line["time"].endswith("Z")


def test_under_systemd_each_line_carries_its_priority(tmp_path, monkeypatch):
    with open(tmp_path / "journal", "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (info.st_dev, info.st_ino))
        configure_logging("text", "DEBUG", stream=stream)
        log = logging.getLogger("surgeond.test")
        log.debug("probe")
        log.info("started")
        log.warning("budget low")
        try:
            raise ValueError("bad frame")
        except ValueError:
            log.exception("serving failed")
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines[:3] == ["<7>surgeond.test DEBUG probe", "<6>surgeond.test INFO started",
                         "<4>surgeond.test WARNING budget low"]
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[3:])


def test_a_terminal_gets_timestamps_and_no_prefix(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")      # some other stream than ours
    out = io.StringIO()
    configure_logging("text", stream=out)
    logging.getLogger("surgeond.test").warning("budget low")
    assert out.getvalue().rstrip().endswith("surgeond.test WARNING budget low")
    assert not out.getvalue().startswith("<")


def test_the_format_is_a_checked_setting():
    assert load_config(None, ["log_format=json"]).log_format == "json"
    with pytest.raises(ConfigError, match="log_format"):
        load_config(None, ["log_format=xml"])
