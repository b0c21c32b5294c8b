"""adapt.pause: stop adaptation steps; serving goes on with the current weights."""

from ..protocol import Args

NAME = "adapt.pause"
LONG = False


def run(ops, args: Args) -> dict:
    ops.set_adapting(False)
    return {"learner": ops.learner_state()}
