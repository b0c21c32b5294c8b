"""ping: check that the daemon answers; replies with its protocol version, pid and the endpoint of
its PUB socket (telemetry, events, predictions)."""

import os

from ..protocol import PROTOCOL_VERSION, Args

NAME = "ping"
LONG = False


def run(ops, args: Args) -> dict:
    control = ops.daemon.control
    return {"pong": True, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "pub_endpoint": control.pub_endpoint if control is not None else None}
