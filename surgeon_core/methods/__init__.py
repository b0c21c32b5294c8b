"""TTA methods behind one interface (``Method.step/reset/state_dict``), found by name.

    from surgeon_core.methods import get_method, args_for
    method = get_method("surgeon")(model, args_for("surgeon"))
"""

from . import bn, cotta, eata, ecotta, mecta, source, surgeon, tent  # noqa: F401
from .base import Method, StepResult
from .bn import BNArgs
from .cotta import CoTTAArgs
from .eata import EATAArgs, EATAFisherArgs
from .ecotta import EcoTTAArgs
from .mecta import MECTAArgs
from .registry import UnknownMethod, get_method, list_methods, register
from .source import SourceArgs
from .surgeon import StaticArgs, SurgeonArgs
from .tent import TentArgs

__all__ = ["Method", "StepResult", "UnknownMethod", "get_method", "list_methods", "register",
           "args_for", "ARGS"]

ARGS = {"source": SourceArgs, "bn": BNArgs, "tent": TentArgs, "eata": EATAArgs,
        "eata+fisher": EATAFisherArgs, "cotta": CoTTAArgs, "mecta": MECTAArgs,
        "surgeon": SurgeonArgs, "static": StaticArgs, "ecotta": EcoTTAArgs}


def args_for(name: str, **overrides):
    """The default arguments of method ``name``, with ``overrides`` applied."""
    get_method(name)  # raises UnknownMethod with the known names
    return ARGS[name](**overrides)
