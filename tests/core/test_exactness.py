"""Keep ratio 1 + lossless storage == plain autograd; pruning changes only weight gradients."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.norm import RunningStatNorm2d, ShiftGate, convert_batchnorm
from surgeon_core.sparsity import select_topk

from surgeon_core.models import resnet20

from .allocations import peak_allocated_bytes, tensor_bytes
from .models_zoo import MODELS


def _grads(model, x, capture=None, keep_ratios=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # same dropout masks in both runs
    if capture is None:
        out = model(x)
    else:
        with capture.record(keep_ratios or {}):
            out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.clone()
    return out.detach(), grads


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("lean", [False, True], ids=["batchnorm", "lean_norm"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["counted", "sync_free"])
def test_keep_one_lossless_matches_plain_autograd(name, lean, sync_free):
    model = MODELS[name]().train()
    if lean:
        convert_batchnorm(model)
    x = torch.rand(4, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_out, plain = _grads(model, x)
    model.load_state_dict(state)  # lean norm moved its statistics in the first forward
    policy = dataclasses.replace(CapturePolicy.lossless(), sync_free=sync_free)
    capture = ActivationCapture(model, policy)
    out, captured = _grads(model, x, capture)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    assert captured.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(captured[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def _single_layer_check(layer: nn.Module, x: torch.Tensor, keep: float):
    capture = ActivationCapture(layer, CapturePolicy(value_dtype="fp32", selection="topk"))
    x = x.clone().requires_grad_(True)
    with capture.record({"": keep}):
        out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    capture.close()
    pruned_x = torch.where(select_topk(x.detach().reshape(-1), keep).view_as(x), x.detach(), 0.0)
    ref_w = torch.autograd.grad(layer(pruned_x), layer.weight, grad_out)[0]
    ref_x = x.detach().clone().requires_grad_(True)
    ref_in = torch.autograd.grad(layer(ref_x), ref_x, grad_out)[0]
    return layer.weight.grad, ref_w, x.grad, ref_in


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 5, 3, padding=1), (2, 3, 8, 8)),
    (nn.Linear(12, 4), (6, 12)),
])
def test_pruned_weight_gradient_equals_hand_computation(layer, shape):
    got_w, ref_w, got_in, ref_in = _single_layer_check(layer, torch.randn(shape), 0.3)
    torch.testing.assert_close(got_w, ref_w)
    torch.testing.assert_close(got_in, ref_in)  # input gradient stays exact
    dense_w = torch.autograd.grad(layer(torch.randn(shape)).sum(), layer.weight)[0]
    assert not torch.allclose(got_w, dense_w)


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_lean_norm_gradients_match_their_reference(statistics):
    # batch statistics: train-mode BatchNorm's gradient (the centred input gradient);
    # running statistics: BatchNorm with those statistics held constant (MECTA-style)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    norm = RunningStatNorm2d.from_batchnorm(bn, statistics=statistics).train()
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    out = norm(x)
    ref_x = x.detach().clone().requires_grad_(True)
    if statistics == "batch":
        ref = nn.functional.batch_norm(ref_x, None, None, norm.weight, norm.bias, True, 0.0,
                                       norm.eps)
    else:
        mean, var = norm.running_mean.clone(), norm.running_var.clone()
        ref = nn.functional.batch_norm(ref_x, mean, var, norm.weight, norm.bias, False, 0.0,
                                       norm.eps)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)
    expected = torch.autograd.grad(ref, (ref_x, norm.weight, norm.bias), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_a_frozen_lean_norms_input_gradient_needs_one_input_sized_buffer(statistics):
    """Its backward (no x_hat cached) centred the gradient into one buffer and scaled it into a
    second; the centred copy is its own and is now scaled in place."""
    norm = RunningStatNorm2d(16, statistics=statistics).train().requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 16, 32, 32, requires_grad=True)
    var = norm.running_var.clone()
    out = norm(x)
    grad = torch.randn_like(out)
    peak = peak_allocated_bytes(lambda: torch.autograd.grad(out, x, grad, retain_graph=True))
    assert peak <= 1.2 * tensor_bytes(x), peak / tensor_bytes(x)
    # NOTE [Lean normalisation]: statistics are constants, but for batch statistics' centring
    dims = (0, 2, 3)
    centred = grad
    if statistics == "batch":
        invstd = (x.detach().var(dims, unbiased=False) + norm.eps).rsqrt()
        centred = grad - grad.mean(dims, keepdim=True)
    else:
        invstd = (var + norm.eps).rsqrt()
    expected = centred * (norm.weight * invstd).view(1, -1, 1, 1)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], expected)


def test_lean_norm_at_keep_one_equals_train_mode_batchnorm_on_a_whole_model():
    plain = resnet20().train()
    lean = convert_batchnorm(copy.deepcopy(plain))
    x = torch.rand(4, 3, 32, 32)
    _, expected = _grads(plain, x)
    _, got = _grads(lean, x, ActivationCapture(lean, CapturePolicy.lossless()))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_lean_norm_moves_statistics_toward_a_shifted_batch():
    norm = RunningStatNorm2d(3).train()
    norm(torch.randn(16, 3, 4, 4) * 3 + 5)
    assert norm.last_rate > 0.5  # a large shift opens the forget gate
    assert float(norm.running_mean.mean()) > 2.5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("role", ["own gate", "deep"])
def test_lean_norm_ignores_a_non_finite_batch(value, role):
    norm = RunningStatNorm2d(3).train()
    if role == "deep":   # its rate comes from the shallow norms' gate, finite whatever it sees
        shallow, gate = RunningStatNorm2d(3).train(), ShiftGate()
        shallow.join_gate(gate, "shallow", first=True)
        norm.join_gate(gate, "deep")
        shallow(torch.randn(4, 3, 2, 2) + 3.0)
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 0, 0, 0] = value
    norm(bad)
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert norm.last_rate == 0.0
