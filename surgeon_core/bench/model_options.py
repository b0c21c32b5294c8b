"""The model options every surgeon-bench command shares: the same spec the daemon's config takes.

    --model torchvision:mobilenet_v3_large --weights defects.pt --num-classes 4 --input-size 224
    --model python:my_pkg.models:build --model-arg width=32 --python-path ./src --input-size 96
    --model cifar:resnet32 --weights my_resnet32.th         (--arch resnet20 is the older spelling)
"""

import argparse
import ast
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["add_model_options", "model_spec_from", "build_from"]


def add_model_options(p: argparse.ArgumentParser, default: str = "cifar:resnet20") -> None:
    group = p.add_argument_group("model (the same spec as the daemon's model section; "
                                 "docs/MODELS.md)")
    group.add_argument("--model", "--arch", dest="model", default=default, metavar="SPEC",
                       help="cifar:resnet20 (or a bare CIFAR name), torchvision:NAME, or "
                            "python:package.module:callable (default %(default)s)")
    group.add_argument("--weights", default=None, metavar="FILE",
                       help="state dict file, torchvision:DEFAULT (published, downloaded once) "
                            "or random (fresh initialisation, for memory and speed only); "
                            "default for cifar:resnet20/56: the published file under "
                            "$SURGEON_MODELS_DIR")
    group.add_argument("--num-classes", type=int, default=None,
                       help="default: the labels' count, else the architecture's")
    group.add_argument("--labels", default=None, metavar="FILE", help="class names file")
    group.add_argument("--input-size", type=int, default=None, metavar="PX",
                       help="the model's square input (preprocess crop); default: the "
                            "architecture's (32 for CIFAR, the published crop for torchvision)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of the builder or factory (repeatable)")
    group.add_argument("--python-path", action="append", default=[], metavar="DIR",
                       help="folder searched first for python: factories (repeatable)")


def _model_kwargs(items: List[str]) -> Dict[str, Any]:
    kwargs = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("--model-arg takes KEY=VALUE, got %r" % item)
        try:
            kwargs[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw
    return kwargs


def model_spec_from(args: argparse.Namespace):
    from ..models.spec import ModelSpec

    return ModelSpec(arch=args.model, num_classes=args.num_classes, weights=args.weights,
                     labels=args.labels, kwargs=_model_kwargs(args.model_arg),
                     python_path=tuple(str(Path(p)) for p in args.python_path),
                     crop=args.input_size)


def build_from(args: argparse.Namespace):
    """The BuiltModel the options describe (ModelSpecError names any mistake)."""
    from ..models.spec import build_model

    return build_model(model_spec_from(args))
