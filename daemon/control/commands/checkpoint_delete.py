"""checkpoint.delete name: remove a checkpoint and its manifest entry."""

from pydantic import Field

from ..protocol import Args as _Args

NAME = "checkpoint.delete"
LONG = False


class Args(_Args):
    name: str = Field(max_length=64)


def run(ops, args: Args) -> dict:
    ops.delete_checkpoint(args.name)
    return {"deleted": args.name}
