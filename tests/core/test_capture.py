import gc

import pytest
import torch
from torch import nn

from surgeon_core.capture import ActivationCapture, CapturePolicy, Role
from surgeon_core.errors import CaptureError
from surgeon_core.models import resnet20
from surgeon_core.norm import convert_batchnorm
from surgeon_core.sparsity import BitMask

from .models_zoo import MixedNet


def _packed_by_layer(capture, model, x, keep_ratios=None):
    with capture.record(keep_ratios or {}) as rec:
        out = model(x)
    return rec, out, {e.layer: e.packed() for e in rec._entries}


def test_each_saved_tensor_gets_the_storage_of_its_role():
    model = resnet20().train()
    capture = ActivationCapture(model, CapturePolicy())
    rec, out, _ = _packed_by_layer(capture, model, torch.rand(2, 3, 32, 32))
    layers = rec.layers()
    assert layers["layer1.0.conv1"].role == Role.WEIGHT_GRAD
    assert layers["layer1.0.relu1"].role == Role.MASK
    assert layers["layer1.0.bn1"].role == Role.INPUT_GRAD
    assert "avgpool" not in layers or layers["avgpool"].nbytes == 0  # shape only, or nothing
    kinds = {(e.layer, type(e.packed()).__name__) for e in rec._entries}
    assert ("layer1.0.relu1", "BitMask") in kinds
    assert ("layer1.0.bn1", "Exact") in kinds
    assert ("linear", "Pruned") in kinds


def test_average_pool_input_is_kept_as_shape_only():
    model = MixedNet().train()
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record() as rec:
        out = model(torch.rand(2, 3, 8, 8))
    assert rec.layers()["pool"].role == Role.SHAPE and rec.layers()["pool"].nbytes == 0
    out.sum().backward()


def test_parameters_are_referenced_not_copied_or_counted():
    lin = nn.Linear(64, 64, bias=False)
    capture = ActivationCapture(lin, CapturePolicy())
    with capture.record() as rec:
        lin(torch.randn(1, 64))
    # only the (pruned) 64-value input is held; the 16 KB weight is not counted
    assert rec.cache_bytes() < 64 * 4


def test_pruning_really_frees_the_dense_activations():
    conv, relu, conv2 = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)
    model = nn.Sequential(conv, relu, conv2)
    x = torch.rand(4, 3, 16, 16)
    refs, held = [], []
    relu.register_forward_hook(lambda m, i, o: refs.append(o.untyped_storage().data_ptr()))
    for policy, keep, expect_held in ((CapturePolicy(passthrough=True), 1.0, True),
                                      (CapturePolicy(), 0.1, False)):
        capture = ActivationCapture(model, policy)
        refs.clear()
        with capture.record({"0": keep, "2": keep}) as rec:
            out = model(x).sum()
            relu_out = refs[0]
        gc.collect()
        kept = {t.untyped_storage().data_ptr() for e in rec._entries if e.packed() is not None
                for t in e.packed().tensors()}
        assert (relu_out in kept) is expect_held
        held.append(rec.cache_bytes())
        out.backward()
        capture.close()
    assert held[1] < held[0] / 4


def test_a_graph_whose_backward_never_runs_is_freed():
    model = resnet20().train()
    capture = ActivationCapture(model, CapturePolicy(passthrough=True))
    x = torch.rand(8, 3, 32, 32)
    seen = []
    for _ in range(3):   # a meter's forward, or a step that selected nothing: no backward
        with capture.record() as rec:
            model(x)
        seen.append(rec)
    gc.collect()
    assert all(rec.cache_bytes() == 0 for rec in seen)   # NOTE [No cycle through saved tensors]


def test_cache_bytes_count_a_shared_storage_once():
    model = nn.Sequential(nn.Tanh(), nn.Tanh())
    capture = ActivationCapture(model, CapturePolicy(passthrough=True))
    x = torch.randn(1000, requires_grad=True)
    with capture.record() as rec:
        y = model(x)
    # tanh saves its result; the first result is the second's input, so it is counted once
    assert rec.cache_bytes() == 2 * 1000 * 4
    assert sum(c.nbytes for c in rec.layers().values()) == 2 * 1000 * 4
    y.sum().backward()


def test_cache_is_read_while_the_graph_lives_and_drops_after_backward():
    model = resnet20().train()
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record() as rec:
        loss = model(torch.rand(2, 3, 32, 32)).sum()
    assert rec.cache_bytes() > 0
    loss.backward()
    gc.collect()
    assert rec.cache_bytes() == 0


def test_nested_records_are_refused():
    model = nn.Linear(3, 3)
    capture = ActivationCapture(model)
    with capture.record():
        with pytest.raises(CaptureError, match="already open"):
            with capture.record():
                pass


def test_functional_relu_in_a_container_becomes_a_mask_by_its_op():
    model = MixedNet().train()
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record() as rec:
        out = model(torch.rand(2, 3, 8, 8))
    top = [e for e in rec._entries if e.layer == "" and e.kind == "relu"]
    assert top and all(isinstance(e.packed(), BitMask) for e in top)
    out.sum().backward()


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x ** 2


def test_what_no_rule_knows_is_stored_exactly():
    class Net(nn.Module):
        def forward(self, x):
            return _Cube.apply(x)

    model = Net()
    capture = ActivationCapture(model, CapturePolicy(input_grad="fp16"))
    x = torch.randn(50, requires_grad=True)
    with capture.record() as rec:
        out = model(x)
    assert [type(e.packed()).__name__ for e in rec._entries] == ["Exact"]
    out.sum().backward()
    torch.testing.assert_close(x.grad, 3 * x.detach() ** 2)


def test_inplace_relu_and_lean_norm_compose():
    model = convert_batchnorm(resnet20()).train()
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record({"layer1.0.bn1": 0.2}):
        model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_keep_ratio_names_the_layer():
    capture = ActivationCapture(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fc.*1.5"):
        with capture.record({"fc": 1.5}):
            pass


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="input_grad"):
        CapturePolicy(input_grad="int4")


def test_lossy_input_grad_policy_halves_norm_inputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    x = torch.rand(4, 3, 16, 16)
    sizes = {}
    for name in ("exact", "fp16"):
        capture = ActivationCapture(model, CapturePolicy(input_grad=name))
        with capture.record() as rec:
            out = model(x)
        sizes[name] = rec.layers()["1"].nbytes
        out.sum().backward()
        capture.close()
    assert sizes["fp16"] * 2 == pytest.approx(sizes["exact"], rel=0.01)


def test_close_removes_every_hook():
    model = resnet20()
    capture = ActivationCapture(model)
    capture.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_frozen_conv_input_is_dropped():
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.requires_grad_(False)
    capture = ActivationCapture(conv, CapturePolicy())
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with capture.record() as rec:
        out = conv(x)
    assert rec.cache_bytes() == 0
    out.sum().backward()
    assert x.grad is not None and conv.bias.grad is not None


def test_a_tensor_two_ops_save_is_cast_once():
    class Attention(nn.Module):
        def forward(self, x):
            weights = torch.softmax(x @ x.transpose(-1, -2), dim=-1)   # softmax saves its output
            return weights.reshape(-1, x.shape[1], x.shape[1]) @ x     # so does the product

    x = torch.randn(3, 16, 8, requires_grad=True)
    sizes = {}
    for policy in ("exact", "fp16"):
        capture = ActivationCapture(Attention(), CapturePolicy(input_grad=policy))
        with capture.record() as rec:
            out = capture.model(x)
        sizes[policy] = rec.cache_bytes()
        softmax = [e.packed() for e in rec._entries if e.kind == "softmax"][0]
        product = [e.packed() for e in rec._entries
                   if e.kind == "matmul" and e.packed().shape == (3, 16, 16)][0]
        shared = softmax.tensors()[0].untyped_storage().data_ptr() == \
            product.tensors()[0].untyped_storage().data_ptr()
        assert shared, policy
        grad = torch.autograd.grad(out.sum(), x)[0]
        assert torch.isfinite(grad).all()
    assert sizes["fp16"] * 2 == sizes["exact"]
