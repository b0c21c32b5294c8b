"""telemetry: one full telemetry snapshot (counters, latency percentiles per stage, memory,
cache, accuracy on labelled streams), the same object the PUB socket sends every second."""

from ..protocol import Args

NAME = "telemetry"
LONG = False


def run(ops, args: Args) -> dict:
    return ops.daemon.snapshot()
