"""config.set key value: change a live setting (the cache budget, learning rate, adaptation on or
off, method options, batch size, log level); 'config.set' with a key that needs a restart is
refused and lists the live keys. The value is validated as at start."""

from typing import Any

from pydantic import Field

from ..protocol import Args as _Args

NAME = "config.set"
LONG = False


class Args(_Args):
    key: str = Field(max_length=200)
    value: Any = None


def run(ops, args: Args) -> dict:
    return {"key": args.key, "value": ops.set_setting(args.key, args.value)}
