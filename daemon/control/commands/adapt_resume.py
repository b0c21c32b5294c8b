"""adapt.resume: start adaptation steps again (and the learner itself if it was off)."""

from ..protocol import Args

NAME = "adapt.resume"
LONG = False


def run(ops, args: Args) -> dict:
    ops.set_adapting(True)
    return {"learner": ops.learner_state()}
