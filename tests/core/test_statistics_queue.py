"""NOTE [Batched statistics updates]: a model's lean norms update their running statistics
together after each forward, with the same result as one norm at a time."""

import copy

import pytest
import torch
from torch import nn

from surgeon_core.norm import (RunningStatNorm2d, _train_forward, convert_batchnorm,
                               split_statistics, symmetric_kl)
from surgeon_core.opcount import OpCounter
from surgeon_core.statistics_queue import StatisticsQueue


def _stack(widths=(3, 5, 8, 4)):
    layers, before = [], 3
    for width in widths:
        layers += [nn.Conv2d(before, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        before = width
    return convert_batchnorm(nn.Sequential(*layers)).train()


def _norms(model):
    return [m for m in model.modules() if isinstance(m, RunningStatNorm2d)]


def _expected(norm, x, mean, var):
    """One norm's update from its input, written out: MECTA's gate or a fixed momentum."""
    batch_mean = x.mean((0, 2, 3))
    batch_var = x.var((0, 2, 3), unbiased=False)
    if norm.gate_scale is None:
        rate = norm.momentum
    else:
        rate = float(-torch.expm1(-norm.gate_scale * symmetric_kl(batch_mean, batch_var, mean,
                                                                  var)))
    return mean + rate * (batch_mean - mean), var + rate * (batch_var - var), rate


def _inputs(model):
    seen = {}
    for norm in _norms(model):
        norm.register_forward_pre_hook(lambda m, inp: seen.setdefault(id(m), []).append(inp[0]))
    return seen


def test_a_models_norms_update_together_as_each_would_alone():
    torch.manual_seed(0)
    model = _stack()
    norms = _norms(model)
    norms[1].gate_scale, norms[1].momentum = None, 0.2     # a fixed momentum among gates
    seen = _inputs(model)
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    with torch.no_grad():
        model(torch.randn(6, 3, 7, 7) * 2 + 1)
    for norm, (mean, var) in zip(norms, before):
        want_mean, want_var, rate = _expected(norm, seen[id(norm)][0], mean, var)
        torch.testing.assert_close(norm.running_mean, want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, want_var, rtol=1e-4, atol=1e-5)
        assert abs(norm.last_rate - rate) < 1e-4


def test_updates_wait_for_the_end_of_the_forward():
    model = _stack()
    first = _norms(model)[0]
    source = first.running_mean.clone()
    moved = []
    model[3].register_forward_hook(lambda *a: moved.append(
        not torch.equal(first.running_mean, source)))
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6) + 3)
    assert moved == [False] and not torch.equal(first.running_mean, source)


def test_a_norm_run_twice_in_one_forward_updates_twice_in_order():
    torch.manual_seed(0)
    norm = RunningStatNorm2d(4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            return self.norm(self.norm(x) * 3 + 2)

    model = convert_batchnorm(Twice()).train()
    seen = _inputs(model)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    with torch.no_grad():
        model(torch.randn(5, 4, 6, 6))
    mean, var, _ = _expected(norm, seen[id(norm)][0], mean, var)
    mean, var, _ = _expected(norm, seen[id(norm)][1], mean, var)
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)


def test_an_update_waiting_outside_a_models_forward_is_neither_lost_nor_misapplied():
    model = _stack()
    norm = _norms(model)[0]
    with torch.no_grad():
        model[0:2](torch.randn(4, 3, 6, 6) + 3)     # a slice runs no model hook
    assert norm.statistics_queue.holds(norm)
    saved = model.state_dict()["1.running_mean"]
    assert not norm.statistics_queue.holds(norm)
    assert not torch.equal(saved, torch.zeros(3)) and torch.equal(saved, norm.running_mean)
    with torch.no_grad():
        model[0:2](torch.randn(4, 3, 6, 6) + 3)
    state = {k: v.clone() for k, v in _stack().state_dict().items()}
    model.load_state_dict(state)      # the waiting update must not land on the loaded values
    torch.testing.assert_close(norm.running_mean, state["1.running_mean"])
    with torch.no_grad():
        model[0:2].eval()(torch.randn(4, 3, 6, 6))
    torch.testing.assert_close(norm.running_mean, state["1.running_mean"])


def test_a_copy_updates_its_own_statistics():
    model = _stack()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(torch.randn(4, 3, 6, 6) + 3)
    assert torch.equal(_norms(model)[0].running_mean, torch.zeros(3))
    assert not torch.equal(_norms(twin)[0].running_mean, torch.zeros(3))
    assert _norms(twin)[0].statistics_queue is not _norms(model)[0].statistics_queue


def test_a_non_finite_batch_leaves_its_norm_alone_and_the_others_move():
    a, b = RunningStatNorm2d(3), RunningStatNorm2d(4)
    queue = StatisticsQueue()
    queue.add(a, torch.full((3,), 2.0), torch.full((3,), 0.5))
    queue.add(b, torch.tensor([1.0, float("nan"), 0.0, 0.0]), torch.full((4,), 0.5))
    queue.flush()
    assert float(a.running_mean[0]) > 0.5 and a.last_rate > 0.5
    assert torch.equal(b.running_mean, torch.zeros(4)) and torch.equal(b.running_var,
                                                                       torch.ones(4))
    assert b.last_rate == 0.0


def test_the_update_costs_the_same_operators_for_any_number_of_norms():
    counts = []
    for widths in ((4, 8), (4, 8, 16, 8, 4, 8, 16, 32)):
        model = _stack(widths)
        x = torch.randn(4, 3, 6, 6)
        with torch.no_grad():
            model(x)                                # layouts are built once
            model[:-1](x)                           # queue the norms' updates, no hook
            queue = _norms(model)[0].statistics_queue
            with OpCounter() as ops:
                queue.flush()
        counts.append(ops.kernels)
    assert counts[0] == counts[1] and counts[0] < 40, counts


def _run(model, x, grad):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return [out.detach()] + grads + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("bits", [0, 1])
def test_the_cpus_statistics_path_equals_the_gpus(bits):
    """NOTE [Statistics on the CPU]: while a counter runs, the CPU takes the GPU's path (one
    training-form kernel); outputs, gradients and running statistics agree with the CPU's."""
    torch.manual_seed(0)
    model = convert_batchnorm(nn.Sequential(*[
        layer for width in (4, 4, 4) for layer in
        (nn.Conv2d(4, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())]),
        xhat_bits=bits).train()
    split_statistics(model, 1)
    twin = copy.deepcopy(model)
    x, grad = torch.randn(6, 4, 5, 5) * 2 + 1, torch.randn(6, 4, 5, 5)
    cpu = _run(model, x, grad)
    with OpCounter() as ops:
        gpu = _run(twin, x, grad)
    with OpCounter():       # the GPU's kernel returns an output the CPU's path does not make
        assert _train_forward(x, None, None, 1e-5, output=False)[0] is not None
    assert _train_forward(x, None, None, 1e-5, output=False)[0] is None
    assert ops.by_name["native_batch_norm_backward"] == 3
    for got, want in zip(gpu, cpu):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
