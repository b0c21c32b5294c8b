"""The budget bounds the step's peak, not only its cache (NOTE [Peak budget]). That a bounded
step stays under the budget is measured in its own process, where glibc returns every block
(tests/core/test_peak.py): in this one, trim mode's meter counts every page a step touches."""

import collections
import copy
import sys

import pytest
import torch
from torch import nn

from surgeon_core.allocator import tune_malloc
from surgeon_core.engine import (MOST_MARGIN, PEAK_MARGIN, PRIOR_FACTOR, EngineConfig,
                                 SparseBackprop, chunk_counts, entropy)
from surgeon_core.errors import BudgetExceeded
from surgeon_core.importance import BudgetPlan
from surgeon_core.methods.surgeon import Surgeon, SurgeonArgs
from surgeon_core.models import cifar_resnet_by_name

MB = 2 ** 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")


def _entropy_loss(model, x):
    logits = model(x)
    return entropy(logits).mean(), logits


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).train()


def test_chunk_counts_halve_down_to_the_smallest_chunk():
    assert chunk_counts(200, 8) == [1, 2, 4, 8, 16]
    assert chunk_counts(64, 8) == [1, 2, 4, 8]
    assert chunk_counts(8, 8) == [1]
    assert chunk_counts(5, 8) == [1]


def test_transients_of_unmeasured_sizes_are_never_guessed_low():
    engine = SparseBackprop(_small_net())
    assert engine.transient_for(64) is None
    engine._transients = {25: collections.deque([10 * MB, 12 * MB])}
    assert engine.transient_for(25) == 12 * MB              # the largest recent one
    assert engine.transient_for(10) == 12 * MB              # a smaller part never needs more
    assert engine.transient_for(50) == 24 * MB              # one size known: in proportion
    engine._transients[50] = collections.deque([16 * MB])   # a low reading at the larger size
    assert engine.transient_for(100) == 48 * MB             # does not flatten the estimate
    assert engine.transient_for(40) == 16 * MB


def test_the_margin_follows_the_widest_swing_between_readings_at_one_size():
    engine = SparseBackprop(_small_net())
    assert engine.margin() == PEAK_MARGIN
    engine._transients = {8: collections.deque([3 * MB]), 16: collections.deque([6 * MB, 9 * MB])}
    assert engine.margin() == pytest.approx(1.5)     # tcmalloc's slack swings like this
    engine._transients[32] = collections.deque([MB, 10 * MB])
    assert engine.margin() == MOST_MARGIN


def test_the_probe_takes_the_samples_the_peak_budget_leaves_room_for():
    engine = SparseBackprop(_small_net(), EngineConfig(probe_samples=10))
    assert engine.probe_count(64) == 10                # no peak budget: all of them
    engine.set_peak_budget(16 * MB)
    assert engine.probe_count(64) == 2                 # not measured yet: the smallest
    engine._outputs_per_sample = 0.5 * MB              # unless the bound (2 x 0.5 x 10) fits
    assert engine.probe_count(64) == 10
    engine._outputs_per_sample = None
    engine._probe_peaks.extend([MB, 1.1 * MB])         # per sample, x 1.1: room for 13
    assert engine.probe_count(64) == 10
    engine.set_peak_budget(8 * MB)
    assert engine.probe_count(64) == 6                 # 8 MiB // 1.21 MiB
    engine.set_peak_budget(16 * MB)
    engine._probe_peaks.extend([3 * MB])               # swing 3x: margin at its most, 2
    assert engine.probe_count(64) == 2                 # 16 MiB // 6 MiB
    engine._probe_peaks.append(9 * MB)
    with pytest.raises(BudgetExceeded, match="probe needs about 18.00 MB on one sample"):
        engine.probe_count(64)


@linux
def test_with_memory_to_spare_the_first_step_runs_whole():
    """The bound that needs no step measured (NOTE [Peak budget]): twice what every module's
    output took. Where it fits, the first step runs the whole batch; where it does not, the
    smallest parts run until their transients are measured."""
    tune_malloc("trim")
    x = torch.rand(32, 3, 16, 16)
    roomy = SparseBackprop(_small_net(), EngineConfig(peak_budget_bytes=1 << 30))
    assert roomy.bound_for(32) is None                       # nothing profiled yet
    assert roomy.step(x, _entropy_loss).chunks == 1
    per_sample = 2 * 8 * 16 * 16 * 4 + 2 * 8 * 4 + 10 * 4    # conv, ReLU; pool, flatten; linear
    assert roomy.bound_for(32) == PRIOR_FACTOR * per_sample * 32
    tight = SparseBackprop(_small_net(), EngineConfig(peak_budget_bytes=512 * 1024))
    assert tight.step(x, _entropy_loss).chunks == 4          # 8 samples each


def _in_chunks(engine, chunks, monkeypatch):
    monkeypatch.setattr(engine, "plan", lambda x, fl: (BudgetPlan(
        {n: 1.0 for n in engine.base_ratios()}, -1, 1.0), chunks))


def test_micro_batches_add_up_to_the_whole_batchs_gradient(monkeypatch):
    whole_net = _small_net()
    split_net = copy.deepcopy(whole_net)
    x = torch.rand(40, 3, 16, 16)
    whole = SparseBackprop(whole_net, EngineConfig(fixed_keep=1.0))
    split = SparseBackprop(split_net, EngineConfig(fixed_keep=1.0))
    _in_chunks(split, 4, monkeypatch)
    one, four = whole.step(x, _entropy_loss), split.step(x, _entropy_loss)
    assert (one.chunks, four.chunks) == (1, 4)
    assert torch.allclose(one.logits, four.logits, atol=1e-6)
    assert four.loss == pytest.approx(one.loss, rel=1e-5)
    for a, b in zip(whole_net.parameters(), split_net.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert four.cache_bytes < one.cache_bytes / 3   # one chunk's graph alive at a time


def test_a_non_finite_micro_batch_discards_the_whole_steps_gradient(monkeypatch):
    net = _small_net()
    engine = SparseBackprop(net, EngineConfig(fixed_keep=1.0))
    _in_chunks(engine, 4, monkeypatch)
    calls = []

    def last_part_poisoned(model, x):
        calls.append(x.shape[0])
        logits = model(x)
        loss = entropy(logits).mean()
        return (loss * float("nan") if len(calls) == 4 else loss), logits

    report = engine.step(torch.rand(40, 3, 16, 16), last_part_poisoned)
    assert report.skipped and calls == [10] * 4
    assert all(p.grad is None for p in net.parameters())
    assert report.logits.shape == (40, 10)


@linux
def test_a_peak_budget_nothing_fits_under_says_why(resnet20_weights, cifar_test_small):
    tune_malloc("trim")
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    method = Surgeon(model, SurgeonArgs())
    for _ in range(2):                                # transients measured after a warm-up
        method.step(cifar_test_small[0][:32])
    method.engine.set_peak_budget(64 * 1024)
    with pytest.raises(BudgetExceeded, match="chunks of 8.*peak budget 0.06 MB"):
        method.step(cifar_test_small[0][:32])


def test_where_the_peak_cannot_be_measured_only_the_cache_is_bounded(resnet20_weights,
                                                                       cifar_test_small):
    tune_malloc("default")   # glibc keeps what it frees: no peak is claimed (NOTE [Step peak])
    try:
        method = Surgeon(cifar_resnet_by_name("resnet20", resnet20_weights), SurgeonArgs())
        method.engine.set_peak_budget(MB)
        method.step(cifar_test_small[0][:32])
        result = method.step(cifar_test_small[0][:32])
        assert result.peak_bytes is None and not method.engine.peak_bounded
        assert result.chunks == 1 and result.updated
    finally:
        tune_malloc("trim")
