"""Serving first (daemon/priority.py): the learner thread is niced on the CPU, and on CUDA the
serving and learner threads queue work on streams of different priority. No GPU runs here:
the CUDA side is checked through the calls it makes."""

import threading

import torch

from daemon import priority
from daemon.serving import publish_weights

from .running import Running, small_config, wait_for


def _nice(tid):
    """A thread's nice value, from /proc (field 19 of its stat line)."""
    with open("/proc/self/task/%d/stat" % tid) as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def test_the_learner_thread_yields_the_cpu_to_serving():
    with Running(small_config()) as daemon:
        wait_for(lambda: daemon.learner.steps >= 1)
        learner_nice = _nice(daemon.learner._thread.native_id)
        serving_nice = _nice(threading.main_thread().native_id)
        gave_way = daemon.telemetry.gauges["gave_way"]
        hooked = len(daemon.learner._give_way)
    assert learner_nice == max(priority.LEARNER_NICE, serving_nice)   # a niced CI stays so
    assert gave_way >= 0 and hooked > 10        # every leaf layer of the learner's model


def test_no_stream_off_cuda_and_the_stream_context_is_then_a_no_op():
    stream = priority.cuda_stream(torch.device("cpu"), priority.SERVING_STREAM_PRIORITY)
    assert stream is None
    with priority.on_stream(stream):
        assert torch.ones(2).sum() == 2
    priority.settle(stream)


def test_serving_asks_for_the_high_priority_stream_and_the_learner_for_the_low(monkeypatch):
    made = []

    class FakeStream:
        def __init__(self, device=None, priority=0):
            made.append((str(device), priority))

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    for level in (priority.SERVING_STREAM_PRIORITY, priority.LEARNER_STREAM_PRIORITY):
        assert isinstance(priority.cuda_stream(torch.device("cuda:0"), level), FakeStream)
    assert made == [("cuda:0", -1), ("cuda:0", 0)]
    assert priority.SERVING_STREAM_PRIORITY < priority.LEARNER_STREAM_PRIORITY  # lower runs first


def test_a_build_without_stream_priorities_falls_back_to_the_default_stream(monkeypatch, caplog):
    def refuse(device=None, priority=0):
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    assert priority.cuda_stream(torch.device("cuda:0"), -1) is None
    assert "default stream" in caplog.text


def test_a_publish_to_cuda_waits_for_its_copies_before_serving_reads(monkeypatch):
    synced = []

    class FakeStream:
        def synchronize(self):
            synced.append(True)

    class FakeCudaTensor:
        is_cuda, device = True, torch.device("cuda:0")

        def __init__(self):
            self.data = self

        def copy_(self, other):
            assert not synced   # the copies are queued first, then waited for
            return self

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    publish_weights([(FakeCudaTensor(), torch.ones(1)), (FakeCudaTensor(), torch.ones(1))],
                    threading.Lock())
    assert synced == [True]            # once per device, not per tensor
    dst = torch.zeros(3)
    publish_weights([(dst, torch.ones(3))], threading.Lock())   # CPU: no stream at all
    assert synced == [True] and torch.equal(dst, torch.ones(3))


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(10)
    return out[0]


def test_the_learners_forward_gives_way_to_a_frame_in_flight_out_of_a_budget():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()))
    turn = priority.ServingTurn()
    x = torch.rand(1, 3, 8, 8)

    def learner():
        turn.attach(model)
        turn.begin_step(0.05)
        with turn.serving():          # a frame that outlasts the budget: never idle
            model(x)                  # waits before the first layer until the budget is spent
        spent = (turn.waits, turn.waited_s)
        turn.begin_step(0.05)
        model(x)                      # nothing in flight: no wait
        return spent, turn.waits

    # serving() runs in the learner's own thread here only to hold a frame "in flight"
    (waits, waited_s), after = _in_thread(learner)
    assert waits == 1 and after == 1            # the budget went on one wait, then none
    assert 0.04 <= waited_s < 1.0               # and a step is slowed by the budget at most
    turn.begin_step(0.05)
    with turn.serving():
        model(x)                                # serving's own thread never waits on itself
    assert turn.waits == 1


def test_a_wait_ends_as_soon_as_the_frame_is_served():
    turn = priority.ServingTurn()
    turn.begin_step(5.0)
    served = threading.Event()

    def serve():
        with turn.serving():
            served.set()
            threading.Event().wait(0.05)

    thread = threading.Thread(target=serve)
    thread.start()
    served.wait(5)
    turn.give_way()
    thread.join()
    assert turn.waits == 1 and turn.waited_s < 1.0
    turn.begin_step(0.0)
    with turn.serving():
        turn.give_way()                        # yield_ms 0: never waits
    assert turn.waits == 1


def test_serving_and_the_learner_share_the_cores_instead_of_asking_for_twice_as_many(
        monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(priority.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert priority.torch_threads(0, learner_on=True) == 3
    assert priority.torch_threads(4, learner_on=True) == 4       # an operator's choice wins
    assert priority.torch_threads(0, learner_on=False) is None   # serving alone: torch's own
    monkeypatch.setattr(priority.os, "sched_getaffinity", lambda pid: {0})
    assert priority.torch_threads(0, learner_on=True) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert priority.torch_threads(0, learner_on=True) is None    # the environment decides


def test_the_daemon_sets_the_shared_thread_count_at_start(monkeypatch):
    from daemon.service import Daemon

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(priority.os, "sched_getaffinity", lambda pid: set(range(4)))
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    Daemon(small_config("threads=0", "control.enabled=false"))
    assert asked == [2]
