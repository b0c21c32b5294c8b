"""model.reset: back to the source weights, statistics and optimizer state, exactly, in the
learner and in serving. Waits for a step in progress."""

from ..protocol import Args

NAME = "model.reset"
LONG = True


def run(ops, args: Args) -> dict:
    return ops.reset()
