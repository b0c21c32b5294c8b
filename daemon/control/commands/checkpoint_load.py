"""checkpoint.load name: restore a checkpoint into the learner and serving. Refused, with
nothing changed, when it is corrupt, unsafe to unpickle, or made for another model."""

from pydantic import Field

from ..protocol import Args as _Args

NAME = "checkpoint.load"
LONG = True


class Args(_Args):
    name: str = Field(max_length=64)


def run(ops, args: Args) -> dict:
    return ops.load_checkpoint(args.name)
