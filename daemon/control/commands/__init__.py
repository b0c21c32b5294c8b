"""One module per command: NAME, LONG (runs on the job thread), optional Args, run(ops, args).

A module's docstring is its help text (the ``help`` command and docs/PROTOCOL.md show it).
"""

from types import ModuleType
from typing import Dict, Type

from ..protocol import Args
from . import (adapt_pause, adapt_resume, budget_set, checkpoint_delete, checkpoint_list,
               checkpoint_load, checkpoint_save, config_get, config_set, model_reset, ping,
               shutdown, source_restart, status, telemetry)
from . import help as help_command

__all__ = ["COMMANDS", "argument_models"]

COMMANDS: Dict[str, ModuleType] = {module.NAME: module for module in (
    ping, status, telemetry, config_get, config_set, budget_set, adapt_pause, adapt_resume,
    model_reset, checkpoint_save, checkpoint_list, checkpoint_load, checkpoint_delete,
    source_restart, shutdown, help_command)}


def argument_models() -> Dict[str, Type[Args]]:
    return {name: getattr(module, "Args", Args) for name, module in COMMANDS.items()}
