"""`surgeond bench-control`: does a flood of bad control requests slow serving?

One daemon serves the replay stream at a fixed rate with the learner off, so serving is all that
runs. Phase one is quiet. In phase two, a separate process sends malformed, oversized,
wrong-type and unknown-command requests as fast as the daemon answers them. Both phases report
serving latency percentiles and frames served. During the flood, the bench also times how
long a real `ping` takes to answer, and counts the log lines the flood caused.
"""

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["run_control_bench", "flood"]

STREAM = "replay://cifar10?schedule=clean:1000000&severity=5&fps=%d&seed=0"
GARBAGE = [b"\x00\xff garbage", b"[1,2,3]",
           b'{"v":1,"id":"w","cmd":"budget.set","args":{"mb":"x"}}',
           b'{"v":1,"id":"u","cmd":"rm.rf"}', b'{"v":9}',
           b'{"v":1,"id":"e","cmd":"ping","args":{"evil":1}}',
           b'{"v":1,"id":"big","cmd":"ping","pad":"' + b"x" * 70000 + b'"}']


def flood(endpoint: str, seconds: float, window: int = 100) -> Dict:
    """Send garbage for ``seconds`` with ``window`` requests in flight; count the replies."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = replies = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while sent - replies < window:
            sock.send(GARBAGE[sent % len(GARBAGE)])
            sent += 1
        if sock.poll(5000):
            errors += not json.loads(sock.recv())["ok"]
            replies += 1
    while replies < sent and sock.poll(5000):
        errors += not json.loads(sock.recv())["ok"]
        replies += 1
    sock.close()
    return {"sent": sent, "replies": replies, "error_replies": errors, "seconds": seconds}


class _CountLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = 0

    def emit(self, record):
        self.lines += 1


def _phase(daemon, seconds: float) -> Dict:
    daemon.telemetry.clear_latency()
    frames = daemon.frames
    time.sleep(seconds)
    infer = daemon.telemetry.snapshot()["latency_ms"]["infer"]
    return {"serving_ms": infer, "frames": daemon.frames - frames,
            "fps": round((daemon.frames - frames) / seconds, 1)}


def _ping_times(endpoint: str, n: int = 20) -> List[float]:
    from .control.client import ControlClient

    client, times = ControlClient(endpoint, timeout_s=10, retries=1), []
    for _ in range(n):
        start = time.perf_counter()
        client.call("ping")
        times.append(round((time.perf_counter() - start) * 1000, 2))
        time.sleep(0.2)
    return times


def run_control_bench(out: Path, fps: int = 60, quiet_s: float = 20, flood_s: float = 20,
                      overrides: Optional[List[str]] = None) -> Dict:
    from .bench import finish
    from .config import load_config
    from .service import Daemon

    work = out.parent.resolve()
    config = load_config(None, ["source.uri=" + STREAM % fps, "learner.enabled=false",
                                "control.runtime_dir=%s" % (work / "run"),
                                "checkpoints.directory=%s" % (work / "checkpoints"),
                                "checkpoints.resume=none", "checkpoints.on_exit=false"]
                         + list(overrides or []))
    daemon, counter = Daemon(config), _CountLines()
    logging.getLogger("surgeond.control").addHandler(counter)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    time.sleep(3)   # warm-up, first chunks of the stream
    quiet = _phase(daemon, quiet_s)
    endpoint = daemon.control.endpoint
    flooder = subprocess.Popen([sys.executable, "-m", "daemon.bench_control", endpoint,
                                str(flood_s)], stdout=subprocess.PIPE, text=True)
    pings: List[float] = []
    pinger = threading.Thread(target=lambda: pings.extend(_ping_times(endpoint)), daemon=True)
    time.sleep(0.5)
    pinger.start()
    flooded = _phase(daemon, flood_s - 1)
    flood_counts = json.loads(flooder.communicate(timeout=60)[0])
    pinger.join(30)
    daemon.request_stop()
    runner.join(30)
    result = {"fps_requested": fps, "quiet": quiet, "flood": dict(flooded, **flood_counts),
              "flood_requests_per_s": round(flood_counts["replies"] / flood_s),
              "ping_ms_during_flood": {"p50": sorted(pings)[len(pings) // 2] if pings else None,
                                       "max": max(pings) if pings else None, "n": len(pings)},
              "warning_lines_logged": counter.lines, "device": str(daemon.device)}
    return finish(out, result, "p99_ratio_flood_over_quiet", flooded["serving_ms"],
                  quiet["serving_ms"])


if __name__ == "__main__":   # the flooding process: bench_control ENDPOINT SECONDS
    print(json.dumps(flood(sys.argv[1], float(sys.argv[2]))))
