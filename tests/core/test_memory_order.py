"""Packing reads a tensor in the order it lies in memory (NOTE [Memory order]): a channels-last
model's activations are not copied into NCHW order to be packed, and come back with their own
strides."""

import copy

import pytest
import torch

from surgeon_core.capture import CapturePolicy
from surgeon_core.engine import EngineConfig, SparseBackprop, entropy
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.norm import RunningStatNorm2d, convert_batchnorm
from surgeon_core.opcount import OpCounter
from surgeon_core.sparsity import (BitMask, Pruned, PrunedFixed, flat_in_memory, memory_order,
                                   prune, shaped_from_memory)

CL = torch.channels_last


def _layouts():
    x = torch.randn(4, 6, 5, 7)
    return [("nchw", x), ("channels_last", x.contiguous(memory_format=CL)),
            ("channels_last_3d", torch.randn(2, 3, 4, 5, 6).contiguous(
                memory_format=torch.channels_last_3d)),
            ("permuted", torch.randn(5, 4, 3).permute(2, 0, 1))]


@pytest.mark.parametrize("name, x", _layouts())
def test_a_tensor_flattens_where_it_lies_and_comes_back_with_its_strides(name, x):
    order = memory_order(x)
    assert (order is None) == x.is_contiguous()
    flat = flat_in_memory(x, order)
    assert flat.data_ptr() == x.data_ptr()      # a view: nothing copied
    back = shaped_from_memory(flat.clone(), x.shape, order)
    assert torch.equal(back, x) and back.stride() == x.stride()


def test_strides_with_no_order_flatten_by_copy_and_still_round_trip():
    x = torch.randn(4, 1, 3).expand(4, 5, 3)     # overlapping: no memory order
    assert memory_order(x) is None
    assert torch.equal(shaped_from_memory(flat_in_memory(x, None), x.shape, None), x)


@pytest.mark.parametrize("form", ["pruned", "fixed", "bitmask"])
def test_packed_channels_last_tensors_unpack_equal_with_their_layout(form):
    x = torch.randn(8, 16, 9, 9).clamp(min=0).contiguous(memory_format=CL)
    if form == "bitmask":
        packed, expected = BitMask(x), (x > 0)
    else:
        packed = prune(x, 1.0, value_dtype=torch.float32, sync_free=form == "fixed")
        assert isinstance(packed, PrunedFixed if form == "fixed" else Pruned)
        expected = x
    out = packed.unpack()
    assert out.is_contiguous(memory_format=CL)
    assert torch.equal(out > 0, expected) if form == "bitmask" else torch.equal(out, expected)


@pytest.mark.parametrize("keep", [0.2, 0.6])
def test_a_channels_last_tensor_prunes_to_the_same_values_as_its_nchw_copy(keep):
    x = torch.randn(8, 16, 12, 12)
    nchw = prune(x, keep, "topk", torch.float32).unpack()
    cl = prune(x.contiguous(memory_format=CL), keep, "topk", torch.float32).unpack()
    assert torch.equal(cl, nchw)


@pytest.mark.parametrize("bits", [1, 2])
def test_quantised_x_hat_of_a_channels_last_input_gives_the_nchw_gradients(bits):
    norm = RunningStatNorm2d(8, xhat_bits=bits).train()
    x = torch.randn(6, 8, 5, 5)
    grads = []
    for layout in (torch.contiguous_format, CL):
        model = copy.deepcopy(norm)
        xi = x.clone(memory_format=layout).requires_grad_(True)
        (model(xi) * torch.arange(x.numel()).view_as(x).float().sin()).sum().backward()
        grads.append((xi.grad, model.weight.grad, model.bias.grad))
    for nchw, cl in zip(*grads):
        torch.testing.assert_close(cl, nchw)


def _step_ops_and_grads(model, x, policy):
    engine = SparseBackprop(model, EngineConfig(policy=policy, fixed_keep=0.3))

    def loss_fn(net, batch):
        logits = net(batch)
        return entropy(logits).mean(), logits

    engine.step(x, loss_fn)          # the first step probes the layers' importance
    model.zero_grad(set_to_none=True)
    with OpCounter() as ops:
        engine.step(x, loss_fn)
    return ops, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_channels_last_models_step_copies_nothing_more_than_the_nchw_one(resnet20_weights):
    """ResNet-20 in channels-last at batch 8: the step counted 977 operators before packing
    read tensors in memory order (65 full-size copies into NCHW order), 912 after, against
    909 for the same model in NCHW."""
    base = convert_batchnorm(cifar_resnet_by_name("resnet20", resnet20_weights)).train()
    x = torch.rand(8, 3, 32, 32)
    lossless = CapturePolicy.lossless()
    nchw_ops, nchw_grads = _step_ops_and_grads(copy.deepcopy(base), x, lossless)
    cl_ops, cl_grads = _step_ops_and_grads(copy.deepcopy(base).to(memory_format=CL),
                                           x.contiguous(memory_format=CL), lossless)
    assert cl_ops.by_name["clone"] <= nchw_ops.by_name["clone"], (cl_ops.by_name["clone"],
                                                                  nchw_ops.by_name["clone"])
    assert cl_ops.kernels <= nchw_ops.kernels + 8, (cl_ops.kernels, nchw_ops.kernels)
    assert cl_grads.keys() == nchw_grads.keys()
    for name, grad in nchw_grads.items():
        torch.testing.assert_close(cl_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
