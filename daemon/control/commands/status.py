"""status: what the daemon is doing: model, method, device, frames and fps, the learner's state
(running, paused, waiting for memory, off), budget and cache MB, the source, the last
checkpoint."""

from ..protocol import Args

NAME = "status"
LONG = False


def run(ops, args: Args) -> dict:
    return ops.status()
