"""surgeon-bench: reproducible measurements of surgeon_core.

    surgeon-bench memory --arch resnet20 --batch-size 200 [--weights PATH] [--budget-mb 30] [--json]
"""

import argparse
import dataclasses
import json
import logging
import platform
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import SurgeonError

logger = logging.getLogger(__name__)


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="cache bytes and step time: full, tent, surgeon, budgets")
    p.add_argument("--arch", default="resnet20", help="CIFAR ResNet (resnet20 .. resnet110)")
    p.add_argument("--weights", type=Path, default=None,
                   help="checkpoint; default: the published one under $SURGEON_MODELS_DIR")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--budget-mb", type=float, default=None, help="also run surgeon under this cap")
    p.add_argument("--probe-every", type=int, default=None,
                   help="0: importance from the latest gradients (the paper, default); "
                        "N: a dense 10-sample probe every N steps (the published code: 1)")
    p.add_argument("--variant", choices=("paper", "published"), default="paper")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_memory)


def _memory(args) -> int:
    import torch

    from ..data import load_cifar10, to_tensor
    from ..engine import EngineConfig, budget_or_none
    from ..models import cifar_resnet_by_name, default_weights_path
    from .memory import as_rows, run_memory_benchmark

    if args.batch_size < 2:
        raise SystemExit("--batch-size must be >= 2 (BatchNorm needs two samples)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weights = args.weights or default_weights_path(args.arch)
    device = torch.device(args.device)
    model = cifar_resnet_by_name(args.arch, weights).to(device)
    images, _ = load_cifar10("test", limit=args.batch_size)
    x = to_tensor(images).to(device)
    engine_config = EngineConfig(variant=args.variant)
    if args.probe_every is not None:
        engine_config = dataclasses.replace(engine_config, probe_every=args.probe_every)
    results = run_memory_benchmark(model, x, args.steps, budget_or_none(args.budget_mb),
                                   engine_config)
    meta = {"arch": args.arch, "weights": str(weights), "batch_size": args.batch_size,
            "steps": args.steps, "probe_every": engine_config.probe_every,
            "variant": engine_config.variant, "device": _device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}
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
    lines = ["%(arch)s, batch %(batch_size)d, %(device)s, torch %(torch)s, %(threads)d threads"
             % meta, "",
             "| config | measured cache MB | x full | paper-convention MB | step s | x full "
             "| mean keep |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        keep = "%.3f" % r.mean_keep if r.mean_keep is not None else "-"
        lines.append("| %s | %.1f | %.3f | %.1f | %.3f | %.2f | %s |" % (
            r.config, r.cache_bytes / 2**20, r.cache_ratio, r.paper_bytes / 2**20,
            r.step_seconds, r.time_ratio, keep))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_memory(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SurgeonError, KeyError, ValueError) as exc:
        print("surgeon-bench: error: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
