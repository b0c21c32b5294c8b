"""checkpoint.list: every checkpoint on disk, oldest first, with time, steps, method, model and
config fingerprints, size; unreadable ones carry an 'error'."""

from ..protocol import Args

NAME = "checkpoint.list"
LONG = True    # reads every file the manifest does not know: off the control thread


def run(ops, args: Args) -> dict:
    return {"checkpoints": ops.list_checkpoints()}
