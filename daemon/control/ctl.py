"""surgeonctl: drive a running surgeond over its control socket.

Exit codes: 0 done; 1 the daemon refused (its error code is printed); 2 bad usage; 3 no daemon
answered; 4 the reply was not protocol v1.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from surgeon_core import package_version
import yaml

from .client import BadReply, ControlClient, DaemonError, Unreachable, curve_keys, find_endpoint
from .watch import watch

__all__ = ["main", "parse_megabytes", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE",
           "EXIT_UNREACHABLE", "EXIT_PROTOCOL"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PROTOCOL = 0, 1, 2, 3, 4
_UNITS = {"": 1.0, "b": 1 / 2**20, "kb": 1 / 1024, "k": 1 / 1024, "mb": 1.0, "m": 1.0,
          "gb": 1024.0, "g": 1024.0}
LONG_TIMEOUT_S = 60.0     # checkpoints and resets wait for a learner step and the disk


def parse_megabytes(text: str) -> Optional[float]:
    """'300MB', '1.5G', '512k', '300' (MB) -> MB; 'none' or 'off' -> None (no cap)."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError("%r: expected a size such as 300MB, 1.5GB or none"
                                         % text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


_SIMPLE_HELP = {"ping": "is the daemon there", "status": "state of the daemon, learner and source",
                "telemetry": "the latest telemetry snapshot", "reset": "back to the source weights",
                "pause": "pause adaptation (serving goes on)", "resume": "resume adaptation",
                "shutdown": "stop the daemon (checkpointing first when configured)"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeonctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + package_version())
    parser.add_argument("--endpoint", help="control socket (default: $SURGEON_ENDPOINT or the "
                        "daemon's runtime directory)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per try")
    parser.add_argument("--retries", type=int, default=3,
                        help="tries before giving up (exit 3; default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("--curve-server-key", default=os.environ.get("SURGEON_CURVE_SERVER_KEY"),
                        help="the daemon's public certificate (CURVE endpoints)")
    parser.add_argument("--curve-client-cert", default=os.environ.get("SURGEON_CURVE_CLIENT_CERT"),
                        help="this client's secret certificate (default: a throwaway pair)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in _SIMPLE_HELP.items():
        sub.add_parser(name, help=text)
    watch = sub.add_parser("watch", help="a live table from the PUB stream")
    watch.add_argument("--count", type=int, default=0, help="stop after this many rows")
    watch.add_argument("--idle-timeout", type=float, default=10.0,
                       help="give up after this many seconds without a row (default %(default)s)")
    watch.add_argument("--plot", type=Path, metavar="PNG",
                       help="keep this PNG of the run so far up to date (as surgeond plot draws)")
    watch.add_argument("--plot-every", type=int, default=10, metavar="ROWS",
                       help="redraw the PNG after this many rows (default %(default)s)")
    checkpoint = sub.add_parser("checkpoint", help="list, save, load or delete checkpoints")
    checkpoint = checkpoint.add_subparsers(dest="action", required=True)
    checkpoint.add_parser("list", help="every checkpoint, newest first")
    for action, text in (("save", "save now, under NAME or as the next automatic one"),
                         ("load", "adapt on from checkpoint NAME"),
                         ("delete", "delete checkpoint NAME")):
        checkpoint.add_parser(action, help=text).add_argument(
            "name", nargs="?" if action == "save" else None, help="the checkpoint's name")
    budget = sub.add_parser("budget", help="cap the cache: 300MB, 1.5GB, none")
    budget.add_argument("size", type=parse_megabytes, help="e.g. 300MB, 1.5GB, 512k, none")
    config = sub.add_parser("config", help="read or change a live setting")
    config = config.add_subparsers(dest="action", required=True)
    config.add_parser("get", help="the running config, or one key of it").add_argument(
        "key", nargs="?", help="SECTION.FIELD, e.g. memory.budget_mb")
    setter = config.add_parser("set", help="change a live setting (validated as a whole config)")
    setter.add_argument("key", help="SECTION.FIELD, e.g. learner.batch_size")
    setter.add_argument("value", help="parsed as YAML: 32, 0.5, true, null")
    sub.add_parser("source", help="act on the camera source").add_argument(
        "action", choices=["restart"], help="restart: rebuild the source now")
    keygen = sub.add_parser("keygen", help="make a CURVE certificate pair")
    keygen.add_argument("directory", type=Path, help="where the two files go")
    keygen.add_argument("--name", default="surgeon", help="file name stem (default %(default)s)")
    sub.add_parser("help", help="the daemon's own help for every command")
    return parser


def _request(args) -> tuple:
    """(command, arguments, long) of the CLI's subcommand."""
    simple = {"ping": "ping", "status": "status", "telemetry": "telemetry", "help": "help",
              "reset": "model.reset", "pause": "adapt.pause", "resume": "adapt.resume",
              "shutdown": "shutdown"}
    if args.command in simple:
        return simple[args.command], {}, args.command == "reset"
    if args.command == "checkpoint":
        named = {} if getattr(args, "name", None) is None else {"name": args.name}
        return "checkpoint." + args.action, named, args.action in ("save", "load")
    if args.command == "budget":
        return "budget.set", {"mb": args.size}, False
    if args.command == "config":
        if args.action == "get":
            return "config.get", {"key": args.key}, False
        return "config.set", {"key": args.key, "value": yaml.safe_load(args.value)}, False
    return "source.restart", {}, False


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        from .security import make_certificates

        public, secret = make_certificates(args.directory, args.name)
        print("public: %s\nsecret: %s" % (public, secret))
        return EXIT_OK
    try:
        curve = curve_keys(args.curve_server_key, args.curve_client_cert)
    except ValueError as exc:
        print("surgeonctl: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    endpoint = args.endpoint or find_endpoint()
    missing = _missing_socket(endpoint)
    if missing:
        print("surgeonctl: no control socket at %s. Is surgeond running? It makes the socket at "
              "start (--endpoint or $SURGEON_ENDPOINT name another)." % missing, file=sys.stderr)
        return EXIT_UNREACHABLE
    client = ControlClient(endpoint, args.timeout, args.retries, curve)
    try:
        if args.command == "watch":
            watch(client, args)
            return EXIT_OK
        cmd, cmd_args, long = _request(args)
        reply = client.request(cmd, cmd_args, timeout_s=max(args.timeout, LONG_TIMEOUT_S)
                               if long else None)
    except DaemonError as exc:
        print("surgeonctl: the daemon refused: %s" % exc, file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as exc:
        print("surgeonctl: no daemon answered at %s (%s). Is surgeond running, and may this user "
              "use its socket?" % (client.endpoint, exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    except BadReply as exc:
        print("surgeonctl: %s" % exc, file=sys.stderr)
        return EXIT_PROTOCOL
    except KeyboardInterrupt:   # the way out of `watch`
        return EXIT_OK
    _print(cmd, reply["result"], args.json)
    return EXIT_OK


def _missing_socket(endpoint: str) -> Optional[str]:
    """The path of an ipc endpoint whose socket file does not exist: nothing could answer, so
    there is nothing to wait for (abstract sockets, ``ipc://@name``, have no file)."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    path = endpoint[len("ipc://"):]
    return None if os.path.exists(path) else path


def _print(cmd: str, result: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    elif cmd == "checkpoint.list":
        print(_checkpoint_table(result["checkpoints"]))
    elif cmd == "help":
        for name, text in result["commands"].items():
            print("%-18s %s" % (name, text.split(":", 1)[-1].strip()))
    else:
        print(yaml.safe_dump(result, sort_keys=False, default_flow_style=False).rstrip())


def _checkpoint_table(entries: List[Dict[str, Any]]) -> str:
    rows = ["%-20s %-19s %8s %-9s %9s  %s" % ("name", "saved", "steps", "method", "bytes",
                                              "note")]
    for entry in entries:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("time", 0)))
        rows.append("%-20s %-19s %8s %-9s %9s  %s" % (
            entry["name"], saved, entry.get("steps", "?"), entry.get("method", "?"),
            entry.get("bytes", "?"), entry.get("error") or ("auto" if entry.get("auto") else "")))
    return "\n".join(rows) if entries else "no checkpoints"


if __name__ == "__main__":
    sys.exit(main())
