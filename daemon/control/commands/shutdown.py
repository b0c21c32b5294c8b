"""shutdown: stop the daemon as SIGTERM does (a checkpoint first when checkpoints.on_exit is set);
replies before it stops."""

from ..protocol import Args

NAME = "shutdown"
LONG = False


def run(ops, args: Args) -> dict:
    ops.shutdown()
    return {"stopping": True}
