"""surgeond: ``run`` the daemon, ``config`` print or check a configuration, ``demo``, ``plot`` a
run's telemetry, the daemon benchmarks ``bench`` and ``bench-control``, and ``doctor`` (a
self-check)."""

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from surgeon_core import package_version
from surgeon_core.errors import SurgeonError

from .config import ConfigError, default_yaml, load_config

__all__ = ["main"]


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting, e.g. learner.batch_size=32 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeond", description=__doc__)
    parser.add_argument("--version", action="version", version="%(prog)s " + package_version())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="YAML file (defaults for anything missing)")
    _add_set(run)
    run.add_argument("--view", action="store_true", help="live status line on stderr")
    cfg = sub.add_parser("config", help="print the default config or check one")
    cfg.add_argument("--print-default", action="store_true",
                     help="print every setting with its default, as YAML")
    cfg.add_argument("--check", type=Path, metavar="FILE",
                     help="validate FILE as `run` would (model, files, source URI); exit 2 "
                     "with the fix on a mistake")
    _add_set(cfg)
    demo = sub.add_parser("demo", help="the embedded demo: replay, adaptation, summary, plot")
    demo.add_argument("--out", type=Path, default=Path("demo-out"),
                      help="folder for the summary, telemetry and demo.png (default %(default)s)")
    demo.add_argument("--save", type=Path, metavar="VIDEO",
                      help="also record the overlaid stream, e.g. demo-out/demo.mp4 (.mkv, .avi)")
    _add_set(demo)
    plot = sub.add_parser("plot", help="a PNG of a run from its telemetry JSONL")
    plot.add_argument("telemetry", type=Path, metavar="RUN_DIR_OR_TELEMETRY.jsonl",
                      help="telemetry.jsonl (rotated NAME.N beside it are read too) or the "
                      "folder holding it")
    plot.add_argument("--out", type=Path, default=Path("run.png"),
                      help="the PNG to write (default %(default)s)")
    plot.add_argument("--title", help="figure title (default: the path)")
    bench = sub.add_parser("bench", help="serving latency with the learner off/on, budget cut")
    bench.add_argument("--out", type=Path, default=Path("bench-out/daemon.json"),
                       help="results JSON (default %(default)s)")
    bench.add_argument("--fps", type=int, default=60, help="replay rate (default %(default)s)")
    bench.add_argument("--off-s", type=float, default=30,
                       help="seconds of serving alone, the learner paused (default %(default)s)")
    bench.add_argument("--on-s", type=float, default=45,
                       help="seconds with the learner on, first (default %(default)s)")
    bench.add_argument("--low-s", type=float, default=30,
                       help="seconds after the budget cut (default %(default)s)")
    bench.add_argument("--budget-mb", type=float, default=8,
                       help="cache budget before the cut (default %(default)s)")
    bench.add_argument("--low-mb", type=float, default=3,
                       help="cache budget after the cut (default %(default)s)")
    _add_set(bench)
    doctor = sub.add_parser("doctor", help="check this machine for the daemon; say what to fix")
    doctor.add_argument("--config", type=Path, help="the YAML file the daemon will run with")
    _add_set(doctor)
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    flood = sub.add_parser("bench-control", help="serving latency under a flood of bad requests")
    flood.add_argument("--out", type=Path, default=Path("bench-out/control.json"),
                       help="results JSON (default %(default)s)")
    flood.add_argument("--fps", type=int, default=60, help="replay rate (default %(default)s)")
    flood.add_argument("--quiet-s", type=float, default=20,
                       help="seconds of serving with no requests (default %(default)s)")
    flood.add_argument("--flood-s", type=float, default=20,
                       help="seconds under a flood of bad requests (default %(default)s)")
    _add_set(flood)
    return parser


def _bench(args) -> int:
    import json

    from .bench import run_bench

    result = run_bench(args.out, args.fps, args.off_s, args.on_s, args.low_s, args.budget_mb,
                       args.low_mb, args.set)
    print(json.dumps(result, indent=1))
    return 0


def _bench_control(args) -> int:
    import json

    from .bench_control import run_control_bench

    result = run_control_bench(args.out, args.fps, args.quiet_s, args.flood_s, args.set)
    print(json.dumps(result, indent=1))
    return 0


def _doctor(args) -> int:
    import json

    from .doctor import FAIL, as_dicts, format_findings, run_checks

    findings = run_checks(load_config(args.config, args.set))
    print(json.dumps(as_dicts(findings), indent=1) if args.json else format_findings(findings))
    return 1 if any(f.status == FAIL for f in findings) else 0


def _plot(args) -> int:
    from .plot import PlotError, plot_run

    try:
        result = plot_run(args.telemetry, args.out, args.title)
    except (PlotError, OSError) as exc:
        print("surgeond plot: %s" % exc, file=sys.stderr)
        return 2
    print("wrote %s: %d snapshots over %.1f %s, %d runs, %d rollbacks%s" % (
        result["out"], result["snapshots"], result["span"], result["unit"], result["runs"],
        result["rollbacks"], ", %d lines skipped" % result["skipped_lines"]
        if result["skipped_lines"] else ""))
    return 0


def _run(args) -> int:
    from .logs import configure_logging
    from .service import Daemon
    from .view import TerminalView, summary_text

    config = load_config(args.config, args.set)
    configure_logging(config.log_format, config.log_level)
    view = TerminalView() if args.view else None
    daemon = Daemon(config, on_snapshot=view)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reopen())
    final = daemon.run()
    if view is not None:
        view.close()
    print(summary_text(final))
    return daemon.exit_code


def _config(args) -> int:
    if args.print_default:
        sys.stdout.write(default_yaml())
        return 0
    if args.check is None and not args.set:
        print("surgeond config: give --print-default or --check FILE", file=sys.stderr)
        return 2
    config = load_config(args.check, args.set)
    from .service import check_config

    built = check_config(config)
    print("configuration is valid (model %s, %d classes, input %d px; source %s; method %s)"
          % (built.builder, built.num_classes, built.preprocessing.crop, config.source.uri,
             config.learner.method))
    return 0


_LEARNING_COMMANDS = ("run", "demo", "bench", "bench-control")


def _preload_allocator(args) -> None:
    """Run again under the configured allocator (NOTE [Preloaded allocator]); a config that
    does not load is left for the command itself to report."""
    from surgeon_core.allocator import exec_with_allocator

    try:
        config = load_config(getattr(args, "config", None), args.set)
    except ConfigError:
        return
    exec_with_allocator(config.memory.allocator)


def main(argv: Optional[List[str]] = None) -> int:
    from .sources.opencv import import_opencv_first

    import_opencv_first()   # before anything imports torch: static TLS on Jetson
    args = _parser().parse_args(argv)
    if argv is None and args.command in _LEARNING_COMMANDS:   # not when called in-process
        _preload_allocator(args)
    import os

    from surgeon_core.allocator import cuda_alloc_conf

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cuda_alloc_conf())   # before CUDA starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "config":
            return _config(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "bench-control":
            return _bench_control(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "plot":
            return _plot(args)
        from .demo import run_demo

        run_demo(args.out, args.set, args.save)
        return 0
    except ConfigError as exc:
        print("surgeond: %s" % exc, file=sys.stderr)
        return 2
    except SurgeonError as exc:
        print("surgeond: cannot start: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
