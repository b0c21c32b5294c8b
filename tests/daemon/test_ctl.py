"""surgeonctl as operators run it: a subprocess against a running daemon."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgeon_core import package_version
from surgeon_core.data import CLASSES
from daemon.control import ctl as ctl_module
from daemon.control.ctl import (EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE,
                                parse_megabytes)

from .running import Running, small_config, wait_for


def _ctl(*args, timeout=60):
    done = subprocess.run([sys.executable, "-m", "daemon.control.ctl"] + list(args),
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("text, mb", [("300MB", 300.0), ("1.5GB", 1536.0), ("512k", 0.5),
                                      ("300", 300.0), ("none", None), ("2 m", 2.0)])
def test_sizes(text, mb):
    assert parse_megabytes(text) == mb


def test_every_subcommand_against_a_running_daemon(private_dirs):
    with Running(small_config()) as daemon:
        wait_for(lambda: daemon.learner.steps >= 2)
        endpoint = ["--endpoint", daemon.control.endpoint]
        code, out, _ = _ctl(*endpoint, "--json", "status")
        assert code == EXIT_OK and json.loads(out)["arch"] == "cifar:resnet20"
        assert _ctl(*endpoint, "ping")[0] == EXIT_OK
        code, out, _ = _ctl(*endpoint, "--json", "telemetry")
        assert json.loads(out)["counters"]["frames"] > 0
        assert _ctl(*endpoint, "budget", "3MB")[0] == EXIT_OK
        assert daemon.policy.cap_bytes == 3 * 2**20
        code, out, _ = _ctl(*endpoint, "config", "get", "memory.budget_mb")
        assert code == EXIT_OK and "value: 3.0" in out
        assert _ctl(*endpoint, "config", "set", "learner.method_args.lr", "0.002")[0] == EXIT_OK
        assert daemon.method.optimizer.param_groups[0]["lr"] == 0.002
        assert _ctl(*endpoint, "pause")[0] == EXIT_OK and daemon.learner.user_paused
        assert _ctl(*endpoint, "resume")[0] == EXIT_OK and not daemon.learner.user_paused
        assert _ctl(*endpoint, "checkpoint", "save", "ctl-test")[0] == EXIT_OK
        code, out, _ = _ctl(*endpoint, "checkpoint", "list")
        assert code == EXIT_OK and "ctl-test" in out and out.startswith("name")
        assert _ctl(*endpoint, "checkpoint", "load", "ctl-test")[0] == EXIT_OK
        assert _ctl(*endpoint, "reset")[0] == EXIT_OK
        assert _ctl(*endpoint, "source", "restart")[0] == EXIT_OK
        png = Path(private_dirs) / "watch.png"
        code, out, _ = _ctl(*endpoint, "watch", "--count", "3", "--plot", str(png),
                            "--plot-every", "2")
        rows = [line for line in out.splitlines() if line[:2].isdigit()]
        assert code == EXIT_OK and len(rows) == 3 and "cache MB" in out and "seeing" in out
        assert any(name in rows[-1] for name in CLASSES)   # the most served class, by name
        assert "confidence" in out and png.stat().st_size > 20_000
        code, out, _ = _ctl(*endpoint, "help")
        assert code == EXIT_OK and "checkpoint.save" in out
        assert _ctl(*endpoint, "checkpoint", "delete", "ctl-test")[0] == EXIT_OK
        code, _, err = _ctl(*endpoint, "checkpoint", "load", "ctl-test")
        assert code == EXIT_REFUSED and "NOT_FOUND" in err
        code, _, err = _ctl(*endpoint, "config", "set", "model.arch", "resnet56")
        assert code == EXIT_REFUSED and "INVALID_ARGS" in err
        assert _ctl(*endpoint, "shutdown")[0] == EXIT_OK
        wait_for(lambda: daemon.grabber.state == "stopped", timeout=30)


def test_no_daemon_is_a_clear_message_and_its_own_exit_code(private_dirs):
    """A socket file a dead daemon left behind: the tries run out, then exit 3."""
    stale = Path(private_dirs) / "run" / "control.sock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    start = time.monotonic()
    code, _, err = _ctl("--timeout", "0.3", "--retries", "2", "status")
    assert code == EXIT_UNREACHABLE and "no daemon answered" in err
    assert "2 tries" in err and time.monotonic() - start < 20


def test_no_socket_file_fails_at_once_without_trying(private_dirs, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a client was made for a socket that does not exist")

    monkeypatch.setattr(ctl_module, "ControlClient", never)
    assert ctl_module.main(["status"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "no control socket at %s/run/control.sock" % private_dirs in err
    assert "Is surgeond running" in err


@pytest.mark.parametrize("module", ["daemon.cli", "daemon.control.ctl", "surgeon_core.bench"])
def test_every_cli_tells_its_version(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[-1] == package_version()


def test_bad_usage_exits_2():
    assert _ctl("budget", "lots")[0] == EXIT_USAGE
    assert _ctl("frobnicate")[0] == EXIT_USAGE


def test_keygen_writes_a_private_secret(tmp_path):
    code, out, _ = _ctl("keygen", str(tmp_path / "keys"), "--name", "ops")
    secret = tmp_path / "keys" / "ops.key_secret"
    assert code == EXIT_OK and secret.is_file() and (secret.stat().st_mode & 0o777) == 0o600
