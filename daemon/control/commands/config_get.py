"""config.get [key]: the configuration in force, or one dotted key of it
(e.g. memory.budget_mb); method options show their live values."""

from typing import Optional

from pydantic import Field

from ..protocol import Args as _Args

NAME = "config.get"
LONG = False


class Args(_Args):
    key: Optional[str] = Field(None, max_length=200)


def run(ops, args: Args) -> dict:
    return {"key": args.key, "value": ops.get_setting(args.key)}
