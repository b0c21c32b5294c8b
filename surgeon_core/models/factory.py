"""``python:package.module:callable``: the user's own model factory.

The callable is imported from the installed environment, or from the folders in ``python_path``
(searched first), and called with the user's keyword arguments, plus ``num_classes`` when it is set
and the callable accepts it. Whatever goes wrong is reported as a FactoryError that names the
module, the callable and what to change.
"""

import difflib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

from ..errors import SurgeonError

__all__ = ["FactoryError", "parse_target", "load_factory", "call_factory"]


class FactoryError(SurgeonError, ValueError):
    """A ``python:`` model that cannot be imported, called, or is not an nn.Module."""


def parse_target(target: str):
    """``pkg.mod:build`` -> ("pkg.mod", "build"); the attribute may be dotted (``Cls.create``)."""
    module, sep, attribute = target.partition(":")
    if not sep or not module.strip() or not attribute.strip():
        raise FactoryError("python:%s: write python:package.module:callable (e.g. "
                           "python:my_models.defects:build)" % target)
    return module.strip(), attribute.strip()


def _add_paths(python_path: Sequence[str]) -> None:
    for folder in reversed(list(python_path)):
        folder = str(Path(folder).expanduser().resolve())
        if not Path(folder).is_dir():
            raise FactoryError("model.python_path entry %s is not a folder" % folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)


def load_factory(target: str, python_path: Sequence[str] = ()) -> Callable[..., Any]:
    module_name, attribute = parse_target(target)
    _add_paths(python_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = (" or in model.python_path (%s)" % ", ".join(python_path)) if python_path else \
            "; set model.python_path to the folder that holds it"
        raise FactoryError("cannot import %s (%s): it is not installed in this environment%s"
                           % (module_name, exc, where)) from None
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything at import
        raise FactoryError("importing %s failed: %s: %s" % (module_name, type(exc).__name__, exc)) \
            from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            known = [n for n in dir(factory) if not n.startswith("_")]
            near = difflib.get_close_matches(part, known, n=3)
            raise FactoryError("%s has no attribute %r%s" % (
                module_name, attribute, (" (did you mean %s?)" % ", ".join(near)) if near else ""))
        factory = getattr(factory, part)
    if not callable(factory):
        raise FactoryError("python:%s is a %s, not a callable that returns an nn.Module"
                           % (target, type(factory).__name__))
    return factory


def _accepts(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def call_factory(target: str, factory: Callable, kwargs: Dict[str, Any],
                 num_classes: Optional[int]) -> nn.Module:
    options = dict(kwargs)
    if num_classes is not None and "num_classes" not in options and _accepts(factory,
                                                                             "num_classes"):
        options["num_classes"] = num_classes
    try:
        model = factory(**options)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise FactoryError("python:%s(%s) raised %s: %s" % (
            target, ", ".join("%s=%r" % kv for kv in sorted(options.items())),
            type(exc).__name__, exc)) from None
    if not isinstance(model, nn.Module):
        raise FactoryError("python:%s returned %s, not a torch.nn.Module"
                           % (target, type(model).__name__))
    return model
