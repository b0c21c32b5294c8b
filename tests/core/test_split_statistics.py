"""Split statistics (NOTE [Split statistics]): shallow norms on batch statistics, deep norms on
running statistics averaged over the current domain, and what that buys on class-sorted
batches of real CIFAR-10-C images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.data.corruptions import corrupt
from surgeon_core.engine import EngineConfig, SparseBackprop
from surgeon_core.methods import args_for, get_method
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.norm import (RunningStatNorm2d, _LeanAffine, convert_batchnorm, shift_gates,
                               split_statistics)


def _stack(depth=6):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return convert_batchnorm(nn.Sequential(*layers), xhat_bits=1)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, RunningStatNorm2d)]


def test_shallow_norms_use_the_batch_and_deep_norms_their_running_statistics():
    model = _stack()
    gate = split_statistics(model, 2)
    norms = _norms(model)
    assert [m.gate_role for m in norms] == ["shallow"] * 2 + ["deep"] * 4
    assert shift_gates(model) == [gate]
    seen = {}
    for index, m in enumerate(norms):
        m.register_forward_hook(lambda mod, inp, out, i=index: seen.__setitem__(i, (inp[0], out)))
    model.train()(torch.randn(8, 4, 6, 6) * 3 + 1)
    x, y = seen[0]
    m = norms[0]
    expected = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    x, y = seen[4]
    m = norms[4]   # its running statistics already include this batch, at the gate's rate
    expected = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_the_gate_settles_within_a_domain_and_restarts_on_a_shift():
    torch.manual_seed(0)
    model = _stack().train()
    gate = split_statistics(model, 2, scale=3.0)
    rates = []
    for step in range(12):
        shift = 0.0 if step < 8 else 4.0     # a new "domain" from step 8 on
        with torch.no_grad():
            model(torch.randn(64, 4, 6, 6) * (1 + shift) + shift)
        rates.append(float(gate.rate()))
    assert rates[0] > 0.5             # the first batch differs from the source statistics
    assert rates[7] < 0.25 and rates[7] < rates[3] < rates[1]   # an average over the domain
    assert rates[8] > 0.9             # a shift restarts it
    count = gate.count
    gate.restart()
    # the full count again, in the same storage: a captured CUDA graph reads it there
    assert gate.count is count and float(count) == gate.max_count


def test_the_gates_count_changes_in_place_and_its_saved_state_is_a_copy():
    torch.manual_seed(0)
    model = _stack().train()
    gate = split_statistics(model, 2, scale=3.0)
    with torch.no_grad():
        model(torch.randn(64, 4, 6, 6))
    gate.rate()
    count, saved = gate.count, gate.state()
    with torch.no_grad():
        model(torch.randn(64, 4, 6, 6) * 3 + 2)
    gate.rate()
    assert gate.count is count and float(count) != float(saved[0])
    gate.load_state(saved)
    assert gate.count is count and float(count) == float(saved[0])


def test_running_statistics_keep_a_one_bit_code_of_x_hat():
    """Under running statistics the code is the sign of the batch-standardised input, mapped
    back through the per-channel affine between the two standardisations."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 6, 6) * 2 + 1
    weight, bias = torch.rand(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    mean, invstd = torch.full((4,), 0.8), torch.full((4,), 0.6)
    batch_mean = x.mean((0, 2, 3))
    batch_invstd = torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    grad = torch.randn_like(x)
    _LeanAffine.apply(x, weight, bias, mean, invstd ** -2 - 1e-5, 1e-5, 1, batch_mean,
                      batch_invstd).backward(grad)
    shape = (1, -1, 1, 1)
    z = (x - batch_mean.view(shape)) * batch_invstd.view(shape)
    coded = torch.where(z > 0, 0.7979, -0.7979)
    x_hat = (coded / batch_invstd.view(shape) + batch_mean.view(shape) - mean.view(shape)) \
        * invstd.view(shape)
    torch.testing.assert_close(weight.grad, (grad * x_hat).sum((0, 2, 3)), rtol=1e-3, atol=1e-3)


def test_side_forwards_leave_the_gate_as_it_was():
    model = _stack().train()
    gate = split_statistics(model, 2)
    with torch.no_grad():
        model(torch.randn(32, 4, 6, 6))
    before = float(gate.count)
    engine = SparseBackprop(model, EngineConfig())
    engine._learn_sizes_from(torch.randn(4, 4, 6, 6) * 9 + 5)
    assert float(gate.count) == before


@pytest.fixture(scope="module")
def sorted_domains():
    """400 CIFAR-10 test images in class order, at gaussian noise 5 (the frozen model fails)
    and at brightness 5 (it does well): each a stream of its own."""
    images, labels = load_cifar10("test", limit=400)
    order = np.argsort(labels, kind="stable")
    return [(to_tensor(corrupt(images, name, 5, seed=0))[order], torch.from_numpy(labels)[order])
            for name in ("gaussian_noise", "brightness")]


def _error(name, weights, x, y, batch=50, **overrides):
    model = cifar_resnet_by_name("resnet20", weights)
    method = get_method(name)(model, args_for(name, **overrides))
    wrong = 0
    for i in range(0, len(x), batch):
        wrong += int((method.step(x[i:i + batch]).logits.argmax(1) != y[i:i + batch]).sum())
    return 100.0 * wrong / len(x)


def test_class_sorted_batches_do_not_make_surgeon_worse_than_the_frozen_model(
        resnet20_weights, sorted_domains):
    """Measured: source 74.0 / 12.5 % (mean 43.3), batch statistics 73.0 / 62.8 (67.9), split
    statistics 55.0 / 28.3 (41.6)."""
    def mean_error(name, **overrides):
        return np.mean([_error(name, resnet20_weights, x, y, **overrides)
                        for x, y in sorted_domains])

    source = mean_error("source")
    assert mean_error("surgeon", statistics="batch") > source + 15   # the failure
    assert mean_error("surgeon") <= source
