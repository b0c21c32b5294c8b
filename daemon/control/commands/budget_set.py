"""budget.set mb: cap the activation cache at this many MB (null: only the share of available
memory bounds it); the learner re-plans before its next step."""

from typing import Optional

from pydantic import Field

from ..protocol import Args as _Args

NAME = "budget.set"
LONG = False


class Args(_Args):
    mb: Optional[float] = Field(..., gt=0, le=1_000_000)


def run(ops, args: Args) -> dict:
    return {"budget_mb": ops.set_setting("memory.budget_mb", args.mb)}
