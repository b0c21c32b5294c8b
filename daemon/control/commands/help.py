"""help [cmd]: every command with its help text (this docstring for 'help')."""

from typing import Optional

from pydantic import Field

from ..protocol import Args as _Args

NAME = "help"
LONG = False


class Args(_Args):
    cmd: Optional[str] = Field(None, max_length=64)


def run(ops, args: Args) -> dict:
    from . import COMMANDS

    chosen = {args.cmd: COMMANDS[args.cmd]} if args.cmd in COMMANDS else COMMANDS
    return {"commands": {name: " ".join((module.__doc__ or "").split())
                         for name, module in sorted(chosen.items())}}
