"""TTA methods behind one interface (``Method.step/reset/state_dict``), found by name.

    from surgeon_core.methods import get_method, args_for
    method = get_method("surgeon")(model, args_for("surgeon"))
"""

import dataclasses
import math
import typing

from . import bn, cotta, eata, ecotta, mecta, rdumb, source, surgeon, tent  # noqa: F401
from .base import Method, StepResult
from .bn import BNArgs
from .cotta import CoTTAArgs
from .eata import EATAArgs, EATAFisherArgs
from .ecotta import EcoTTAArgs
from .mecta import MECTAArgs
from .rdumb import RDumbArgs
from .registry import UnknownMethod, get_method, list_methods, register
from .source import SourceArgs
from .surgeon import StaticArgs, SurgeonArgs
from .tent import TentArgs

__all__ = ["Method", "StepResult", "UnknownMethod", "get_method", "list_methods", "register",
           "args_for", "ARGS"]

ARGS = {"source": SourceArgs, "bn": BNArgs, "tent": TentArgs, "eata": EATAArgs,
        "eata+fisher": EATAFisherArgs, "cotta": CoTTAArgs, "mecta": MECTAArgs,
        "surgeon": SurgeonArgs, "static": StaticArgs, "ecotta": EcoTTAArgs, "rdumb": RDumbArgs}


def args_for(name: str, **overrides):
    """The default arguments of method ``name``, with ``overrides`` applied.

    Raises:
        UnknownMethod: no such method.
        TypeError: an unknown option, or a value of the wrong type (``lr="-1x"``, ``steps=1.5``),
            so a benchmark or the daemon refuses it before any work.
    """
    get_method(name)  # raises UnknownMethod with the known names
    fields = {f.name: f for f in dataclasses.fields(ARGS[name])}
    for key, value in overrides.items():
        if key not in fields:
            raise TypeError("%s has no option %r; options: %s"
                            % (name, key, ", ".join(sorted(fields))))
        _check_type(name, key, value, fields[key].type)
    return ARGS[name](**overrides)


def _check_type(method: str, key: str, value, annotation) -> None:
    optional = typing.get_origin(annotation) is typing.Union
    kind = [a for a in typing.get_args(annotation) if a is not type(None)][0] if optional \
        else annotation
    if value is None and optional:
        return
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise TypeError("%s.%s must be %s%s, got %r" % (
            method, key, {float: "a finite number", int: "an integer", bool: "true or false",
                          str: "text"}.get(kind, getattr(kind, "__name__", str(kind))),
            " or null" if optional else "", value))
