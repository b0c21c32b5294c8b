"""surgeon-bench: reproducible measurements of surgeon_core, on the bundled CIFAR ResNets or on
your own model (the same --model spec as the daemon's model section).

    surgeon-bench memory --model cifar:resnet20 --batch-size 200 [--budget-mb 30] [--json]
    surgeon-bench memory --model torchvision:mobilenet_v3_large --weights mine.pt \
        --num-classes 4 --batch-size 16
    surgeon-bench continual --methods source,bn,tent,surgeon --batch-size 200 --severity 5 \
        [--limit N] [--corruption-dir DIR [--domains a,b] [--layout single]] --out DIR
    surgeon-bench ecotta-warmup --model cifar:resnet20 --epochs 10 --out warmup.pt
    surgeon-bench footprint --batch-size 200 --steps 20     # SURGEON_MALLOC / LD_PRELOAD
"""

import argparse
import ast
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .. import package_version
from ..errors import SurgeonError
from .model_options import add_model_options, build_from
from .streams import PROTOCOLS

logger = logging.getLogger(__name__)


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="cache bytes and step time: full, tent, surgeon, budgets")
    add_model_options(p)
    p.add_argument("--batch-size", type=int, default=200,
                   help="images per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--budget-mb", type=float, default=None, help="also run surgeon under this cap")
    p.add_argument("--peak-budget-mb", type=float, default=None,
                   help="also run surgeon under this cap on the step's peak (NOTE [Peak budget])")
    p.add_argument("--probe-every", type=int, default=None,
                   help="0: importance from the latest gradients (the paper, default); "
                        "N: a dense 10-sample probe every N steps (the published code: 1)")
    p.add_argument("--variant", choices=("paper", "published"), default="paper",
                   help="importance: paper (min-max normalised) or published (raw G x M)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_memory)


def _memory(args) -> int:
    import torch

    from ..data import load_cifar10, to_tensor
    from ..engine import EngineConfig, budget_or_none
    from .memory import as_rows, run_memory_benchmark

    if args.batch_size < 2:
        raise SystemExit("--batch-size must be >= 2 (BatchNorm needs two samples)")
    if args.threads:
        torch.set_num_threads(args.threads)
    built = build_from(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = built.model.to(device)
    images, _ = load_cifar10("test", limit=args.batch_size)
    # real images at the model's input size, through the model's own preprocessing
    x = built.preprocessing(to_tensor(images)).to(device)
    engine_config = EngineConfig(variant=args.variant)
    if args.probe_every is not None:
        engine_config = dataclasses.replace(engine_config, probe_every=args.probe_every)
    results = run_memory_benchmark(model, x, args.steps, budget_or_none(args.budget_mb),
                                   engine_config, budget_or_none(args.peak_budget_mb))
    meta = {"model": built.builder, "arch": built.builder, "weights": built.weights,
            "input_size": built.preprocessing.crop, "num_classes": built.num_classes,
            "batch_size": args.batch_size,
            "steps": args.steps, "probe_every": engine_config.probe_every,
            "variant": engine_config.variant, "device": _device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "command": "surgeon-bench " + " ".join(sys.argv[1:])}
    if args.json:
        print(json.dumps({"meta": meta, "results": as_rows(results)}, indent=2))
    else:
        print(_table(meta, results))
    return 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (%s)" % (platform.processor() or platform.machine())


def _table(meta, results) -> str:
    lines = ["%(model)s at %(input_size)d px, batch %(batch_size)d, %(device)s, torch %(torch)s, "
             "%(threads)d threads; weights %(weights)s" % meta, "",
             "| config | measured cache MiB | x full | paper-convention MiB | step peak MiB "
             "| x full | step s | x full | ops/step | x full | CPU-path ops | x full | mean keep "
             "| largest parts of the cache (kind/role MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        keep = "%.3f" % r.mean_keep if r.mean_keep is not None else "-"
        peak = "-" if r.peak_step_bytes is None else "%.1f" % (r.peak_step_bytes / 2**20)
        peak_ratio = "-" if r.peak_ratio is None else "%.3f" % r.peak_ratio
        lines.append("| %s | %.1f | %.3f | %.1f | %s | %s | %.3f | %.2f | %s | %s | %s | %s |" % (
            r.config + _parts(r),
            r.cache_bytes / 2**20, r.cache_ratio, r.paper_bytes / 2**20, peak,
            peak_ratio, r.step_seconds, r.time_ratio, _ops(r.ops, r.ops_ratio),
            _ops(r.cpu_ops, r.cpu_ops_ratio), keep, _largest(r.kinds)))
    lines += ["", "step peak: what one step added at its worst above what the process held "
              "when it began (CPU: the kernel's resident high-water mark, reset per step after "
              "the heaps' free pages were handed back; CUDA: max_memory_allocated); "
              "NOTE [Step peak]",
              "ops/step: ATen operators one step dispatches, views left out (each is at least "
              "one kernel launch on a GPU), counted on the paths a GPU takes; CPU-path ops: "
              "the same step on the CPU's own fast paths (CPU runs); surgeon_core/opcount.py"]
    return "\n".join(lines)


def _ops(count, ratio) -> str:
    return "- | -" if count is None else "%d | %.2f" % (count, ratio or 0)


def _parts(result) -> str:
    """Under a peak budget: the micro-batches, and the highest peak of any step run (the
    budget holds for every one, NOTE [Peak budget])."""
    notes = ["%d micro-batches" % result.chunks] if result.chunks > 1 else []
    if result.budget_bytes is not None and result.highest_peak_bytes is not None:
        notes.append("highest step %.1f" % (result.highest_peak_bytes / 2**20))
    return " (%s)" % "; ".join(notes) if notes else ""


def _largest(kinds, count: int = 4) -> str:
    return ", ".join("%s %.1f" % (name, size / 2**20)
                     for name, size in list(kinds.items())[:count] if size >= 2**16)


def _add_continual(sub) -> None:
    for name, text in (("continual", "continual CIFAR-10-C (or your own folder of domains): "
                        "error, measured cache, time"),
                       ("stream", "any stream protocol: continual, long, gradual, correlated, "
                        "mixed, camera")):
        p = sub.add_parser(name, help=text)
        _stream_options(p, default_protocol="continual")
        p.set_defaults(func=_continual)


def _stream_options(p, default_protocol: str) -> None:
    add_model_options(p)
    p.add_argument("--protocol", default=default_protocol, choices=PROTOCOLS,
                   help="continual (the paper), long (the domains --loops times), gradual "
                        "(severity 1..5..1), correlated (Dirichlet class order), mixed (all "
                        "domains shuffled together), camera (served frame by frame, learning on "
                        "the ring buffer as the daemon does)")
    p.add_argument("--methods", default="source,bn,tent,eata,cotta,mecta,static,surgeon",
                   help="comma-separated methods (and variants, e.g. surgeon,rdumb)")
    p.add_argument("--batch-size", type=int, default=200,
                   help="images per step (default %(default)s)")
    p.add_argument("--severity", type=int, default=None, choices=(1, 2, 3, 4, 5),
                   help="severity of a stacked folder (default 5); a single-layout folder holds "
                        "one severity per file")
    p.add_argument("--limit", type=int, default=None, help="first N images of each domain")
    p.add_argument("--seed", type=int, default=1, help="stream shuffling seed")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep each domain in the folder's order")
    p.add_argument("--alpha", type=float, default=None,
                   help="order each domain's classes with a Dirichlet(alpha) over time (0: "
                        "sorted by class); correlated defaults to 0.1")
    p.add_argument("--loops", type=int, default=10, help="long: passes over the domains")
    p.add_argument("--schedule", default=None, metavar="NAME:N,...",
                   help="windows instead of the domain list, e.g. clean:600,fog:1800 (the "
                        "daemon's replay syntax; clean is the CIFAR-10 test set)")
    p.add_argument("--fresh-frames", type=int, default=32,
                   help="camera: new frames per learner step (the daemon's default)")
    p.add_argument("--data-seed", type=int, default=0, help="corruption generator seed")
    p.add_argument("--corruption-dir", type=Path, default=None,
                   help="your folder of <domain>.npy + labels.npy (the released CIFAR-10-C "
                        "layout or one severity per file); read only, never written. Default: "
                        "CIFAR-10-C generated once into $SURGEON_CACHE_DIR")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains of the folder, in stream order (default: "
                        "CIFAR-10-C's corruptions in the fixed order, then other names sorted)")
    p.add_argument("--layout", choices=("auto", "stacked", "single"), default="auto",
                   help="stacked: 5 severities per file; single: one; auto: from labels.npy")
    p.add_argument("--workers", type=int, default=2, help="processes generating corruptions")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method argument, e.g. surgeon.lr=1e-4 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for results.json, results.md and the plots")


def _parse_overrides(items: List[str]) -> Dict[str, Dict]:
    out: Dict[str, Dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError("--set takes METHOD.KEY=VALUE, got %r" % item)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(method, {})[field] = value
    return out


def _continual(args) -> int:
    import torch
    from tqdm import tqdm

    from .camera import run_camera
    from .continual import results_json, run_stream
    from .report import markdown_table, save_plots

    if args.threads:
        torch.set_num_threads(args.threads)
    methods, overrides, built, stream, severity = _plan_continual(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    camera = args.protocol == "camera"
    chunk = args.fresh_frames if camera else args.batch_size
    steps = len(methods) * sum(-(-len(w) // chunk) for w in stream.windows)
    start = time.perf_counter()
    with tqdm(total=steps, unit="batch", disable=None) as bar:
        if camera:
            runs = [run_camera(name, built.model, stream, args.batch_size, args.fresh_frames,
                               device, overrides.get(name), bar, built.preprocessing)
                    for name in methods]
        else:
            runs = run_stream(built.model, methods, stream, args.batch_size, device, overrides,
                              bar, built.preprocessing)
    meta = _stream_meta(args, built, stream, severity, overrides)
    meta.update(device=_device_name(device), torch=torch.__version__,
                wall_seconds=time.perf_counter() - start)
    (args.out / "results.json").write_text(json.dumps(results_json(runs, meta), indent=1))
    table = markdown_table(runs, meta)
    (args.out / "results.md").write_text(table + "\n")
    save_plots(runs, args.out)
    print(table)
    return 0


def _stream_meta(args, built, stream, severity, overrides):
    """What a stream run was: model, protocol and its settings, data, and the command."""
    camera = args.protocol == "camera"
    return {"protocol": args.protocol, "model": built.builder, "arch": built.builder,
            "weights": built.weights, "input_size": built.preprocessing.crop,
            "batch_size": args.batch_size, "severity": severity,
            "images_per_corruption": min(args.limit or stream.domains.rows, stream.domains.rows),
            "domains": list(stream.domains.domains), "layout": stream.domains.layout,
            "windows": [w.name for w in stream.windows], "alpha": _alpha(args),
            "loops": args.loops if args.protocol == "long" else None,
            "fresh_frames": args.fresh_frames if camera else None,
            "shuffle": not args.no_shuffle, "seed": args.seed, "data_seed": args.data_seed,
            "corruption_dir": str(stream.domains.folder), "overrides": overrides,
            "command": "surgeon-bench " + " ".join(sys.argv[1:])}


def _alpha(args):
    return 0.1 if args.protocol == "correlated" and args.alpha is None else args.alpha


def _schedule(text):
    if not text:
        return None
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition(":")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError("--schedule item %r: expected name:images, images >= 1" % item)
        entries.append((name.strip(), int(count)))
    return entries


def _plan_continual(args):
    """Methods and options, the model, the domain folder and the output folder, all checked."""
    from ..errors import DataNotFound
    from ..methods import args_for

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = _parse_overrides(args.set)
    for name in methods:
        args_for(name, **overrides.get(name, {}))
    unused = sorted(set(overrides) - set(methods))
    if unused:
        raise ValueError("--set names %s, which --methods does not run" % ", ".join(unused))
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be >= 1")
    built = build_from(args)
    domains = _domain_folder(args)
    from .streams import build_stream

    if domains.layout == "single" and args.severity is not None:
        raise ValueError("%s holds one severity per file (single layout): drop --severity, or "
                         "pass --layout stacked if each file stacks severities 1..5"
                         % domains.folder)
    severity = (args.severity or 5) if domains.layout == "stacked" else None
    import numpy as np

    top = int(np.load(domains.folder / "labels.npy", mmap_mode="r").max())
    if top >= built.num_classes:
        raise DataNotFound("labels in %s go up to %d but %s has %d classes"
                           % (domains.folder, top, built.builder, built.num_classes))
    stream = build_stream(args.protocol, domains, severity, args.limit, args.seed,
                          not args.no_shuffle, _alpha(args), args.loops, _schedule(args.schedule))
    if args.protocol == "camera":
        _check_camera(args, methods, overrides, built)
    args.out.mkdir(parents=True, exist_ok=True)
    return methods, overrides, built, stream, severity


def _check_camera(args, methods, overrides, built) -> None:
    """The camera serves frame by frame: methods that normalise with batch statistics cannot."""
    import copy

    from ..methods import args_for, get_method
    from .camera import serving_compatible

    if not 1 <= args.fresh_frames <= args.batch_size:
        raise ValueError("--fresh-frames must be between 1 and --batch-size")
    for name in methods:
        method = get_method(name)(copy.deepcopy(built.model), args_for(name, **overrides.get(
            name, {})))
        why = serving_compatible(method.model)
        if why:
            raise ValueError("%s cannot run on the camera protocol: %s" % (name, why))


def _domain_folder(args):
    from .. import paths
    from ..data.cifar10c import build_cifar10c
    from ..data.domains import open_domains

    names = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    if args.corruption_dir is not None:   # the user's folder: read, never written
        return open_domains(args.corruption_dir, names, args.layout)
    folder = paths.cache_dir() / ("cifar10c-seed%d-n%d" % (args.data_seed, args.limit or 10000))
    build_cifar10c(folder, limit=args.limit, seed=args.data_seed, workers=args.workers)
    return open_domains(folder, names, args.layout)


def _add_ecotta_warmup(sub) -> None:
    p = sub.add_parser("ecotta-warmup", help="train EcoTTA's meta networks on the training set")
    add_model_options(p)
    p.add_argument("--epochs", type=int, default=10,
                   help="passes over the training images (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="training batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N training images")
    p.add_argument("--test-limit", type=int, default=None,
                   help="first N test images for the clean accuracies (default: all 10,000)")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="stop after this many steps (a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="the warm-up file to write")
    p.set_defaults(func=_ecotta_warmup)


def _ecotta_warmup(args) -> int:
    import torch
    from tqdm import tqdm

    from ..data import CLASSES, load_cifar10, to_tensor
    from .ecotta_warmup import WarmupSettings, warm_up

    if args.threads:
        torch.set_num_threads(args.threads)
    built = build_from(args)
    if built.num_classes != len(CLASSES):
        raise ValueError("ecotta-warmup trains on CIFAR-10's training set, but %s has %d classes"
                         % (built.builder, built.num_classes))
    model = built.model
    train_x, train_y = load_cifar10("train", limit=args.limit)
    test_x, test_y = load_cifar10("test", limit=args.test_limit)
    images = built.preprocessing(to_tensor(train_x))
    labels = torch.from_numpy(train_y)
    test = (built.preprocessing(to_tensor(test_x)).to(args.device),
            torch.from_numpy(test_y).to(args.device))
    settings = WarmupSettings(args.epochs, args.batch_size, args.lr, seed=args.seed,
                              max_iterations=args.max_iterations)
    total = args.max_iterations or args.epochs * -(-len(images) // args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, unit="it", disable=None) as bar:
        info = warm_up(model, images, labels, args.out, settings, test, bar.update,
                       torch.device(args.device), built.identity)
    acc = info["clean_accuracy"]
    print("wrote %s: %d iterations in %.0f s" % (args.out, info["iterations"], info["seconds"]))
    print("clean test accuracy  eval mode  batch statistics (200)")
    for name in ("original", "with_meta"):
        print("%-19s %8.2f %% %16.2f %%" % (name.replace("_", " "), 100 * acc[name]["eval"],
                                            100 * acc[name]["batch_statistics_200"]))
    return 0


def _add_footprint(sub) -> None:
    p = sub.add_parser("footprint", help="the process's resident set over a run of steps: "
                       "full backprop against the daemon's learner, each in its own process")
    add_model_options(p)
    p.add_argument("--batch-size", type=int, default=200,
                   help="images per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=20,
                   help="steps per configuration (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--configs", default="full,daemon",
                   help="comma-separated: full, daemon (default %(default)s)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # a child's own config
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_footprint)


def _footprint(args) -> int:
    import subprocess

    if args.one:
        return _footprint_one(args)
    rows = []
    for config in args.configs.split(","):
        argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
        out = subprocess.run([sys.executable, "-m", "surgeon_core.bench"] + argv +
                             ["--one", config, "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout))
    _footprint_ratios(rows)
    if args.json:
        print(json.dumps({"command": "surgeon-bench " + " ".join(sys.argv[1:]), "results": rows},
                         indent=2))
    else:
        _print_footprint(rows)
    return 0


def _footprint_ratios(rows) -> None:
    full = next((r for r in rows if r["config"] == "full"), None)
    for row in rows:
        if full and full["rss_growth_bytes"]:
            row["growth_ratio"] = round(row["rss_growth_bytes"] / full["rss_growth_bytes"], 3)
            row["time_ratio"] = round(row["step_seconds"] / full["step_seconds"], 2)
        if full and full["anon_growth_bytes"]:
            row["anon_ratio"] = round(row["anon_growth_bytes"] / full["anon_growth_bytes"], 3)


def _print_footprint(rows) -> None:
    print("| config | allocator | RSS growth MiB (highest) | x full | anonymous MiB | x full "
          "| after the run MiB (anonymous) | step s | x full |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| %s | %s | %.0f | %s | %.0f | %s | %.0f (%.0f) | %.3f | %s |" % (
            r["config"], r["allocator"], r["rss_growth_bytes"] / 2**20,
            r.get("growth_ratio", "-"), r["anon_growth_bytes"] / 2**20, r.get("anon_ratio", "-"),
            r["rss_after_bytes"] / 2**20, r["anon_after_bytes"] / 2**20, r["step_seconds"],
            r.get("time_ratio", "-")))
    print("\nanonymous: the resident set's RssAnon, the process's own memory; the rest of the "
          "growth is file-backed library code run for the first time (shared, reclaimable)")


def _footprint_one(args) -> int:
    import torch

    from ..data import load_cifar10, to_tensor
    from .footprint import measure_footprint

    torch.set_num_threads(args.threads)
    built = build_from(args)
    images, _ = load_cifar10("test", limit=args.batch_size)
    x = built.preprocessing(to_tensor(images))
    result = measure_footprint(args.one, built.model, x, args.steps)
    print(json.dumps(dataclasses.asdict(result)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + package_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_memory(sub)
    _add_continual(sub)
    _add_ecotta_warmup(sub)
    _add_footprint(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from ..allocator import exec_with_allocator, tune_malloc

    if argv is None:   # the daemon's allocator (NOTE [Preloaded allocator]); not in-process
        exec_with_allocator()
    tune_malloc()      # as the daemon does: step peaks and footprints are then what a box sees
    try:
        return args.func(args)
    except (SurgeonError, KeyError, ValueError, TypeError) as exc:
        print("surgeon-bench: error: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
