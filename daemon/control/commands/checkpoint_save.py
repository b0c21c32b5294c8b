"""checkpoint.save [name]: write the learner's state (weights, statistics, optimizer) atomically;
without a name it is an automatic checkpoint, rotated with the last checkpoints.keep_last."""

from typing import Optional

from pydantic import Field

from ..protocol import Args as _Args

NAME = "checkpoint.save"
LONG = True


class Args(_Args):
    name: Optional[str] = Field(None, max_length=64)


def run(ops, args: Args) -> dict:
    return ops.save_checkpoint(args.name)
