"""source.restart: close the frame source and open it again now (a camera that returns stale
frames, a stream whose URL now points elsewhere), without the failure backoff."""

from ..protocol import Args

NAME = "source.restart"
LONG = False


def run(ops, args: Args) -> dict:
    ops.restart_source()
    return {"restarting": True}
