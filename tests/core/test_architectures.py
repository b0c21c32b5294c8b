"""The torchvision families users deploy: every saved tensor gets a named role, and keep 1 with
lossless storage equals plain autograd (outputs, every parameter gradient, the input gradient)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.norm import convert_batchnorm
from surgeon_core import pool_indices
from surgeon_core.pool_indices import PoolIndices, pack_pool_indices, pool_geometry
from .allocations import peak_allocated_bytes, tensor_bytes

torchvision = pytest.importorskip("torchvision")
from torchvision.models import get_model, list_models  # noqa: E402

# small inputs keep the suite fast; ViT is told its size, Swin pads its windows
FAMILIES = {"resnet18": {}, "resnet50": {}, "mobilenet_v2": {}, "mobilenet_v3_large": {},
            "efficientnet_b0": {}, "regnet_y_400mf": {}, "convnext_tiny": {},
            "vit_b_16": {"image_size": 32}, "swin_t": {}}


def _family(name):
    if name not in list_models(module=torchvision.models):
        pytest.skip("torchvision %s has no %s" % (torchvision.__version__, name))
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, **FAMILIES[name]).train()
    head = getattr(getattr(model, "heads", None), "head", None)
    if head is not None:   # ViT's head starts at zero, which would make every gradient zero
        nn.init.normal_(head.weight, std=0.5)
    return model


def _grads(model, x, capture=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)   # the same dropout and stochastic-depth draws in both runs
    if capture is None:
        out = model(x)
    else:
        with capture.record({}) as rec:
            out = model(x)
        _grads.kinds = rec.bytes_by_kind()
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.clone()
    return out.detach(), grads


@pytest.mark.parametrize("lean", [False, True], ids=["batchnorm", "lean_norm"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_at_keep_one_equals_plain_autograd(name, lean):
    model = _family(name)
    if lean:
        convert_batchnorm(model)
    x = torch.rand(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_out, plain = _grads(model, x)
    model.load_state_dict(state)
    capture = ActivationCapture(model, CapturePolicy.lossless())
    out, captured = _grads(model, x, capture)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    assert captured.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(captured[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    unnamed = {k: b for k, b in _grads.kinds.items() if k[0] == "other" and b > 4096}
    assert not unnamed, "saved tensors no rule names: %s" % unnamed


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "convnext_tiny", "swin_t", "vit_b_16"])
def test_family_kinds_are_what_its_layers_are(name):
    model = _family(name)
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record({}) as rec:
        out = model(torch.rand(2, 3, 32, 32))
        kinds = {kind for kind, _ in rec.bytes_by_kind()}
    out.sum().backward()
    expected = {"mobilenet_v3_large": {"hardswish", "hardsigmoid", "product", "relu", "conv"},
                "convnext_tiny": {"gelu", "norm", "scale", "linear", "conv"},
                "swin_t": {"matmul", "softmax", "gelu", "norm", "linear"},
                "vit_b_16": {"attention", "gelu", "norm", "linear"}}[name]
    assert expected <= kinds, kinds


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil", [
    (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 2, False), ((3, 2), (2, 1), (1, 0), 1,
                                                                     True)])
def test_max_pool_indices_pack_to_a_byte_and_backward_is_exact(kernel, stride, padding,
                                                               dilation, ceil):
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool)
    x = torch.randn(2, 3, 13, 11)
    expected = torch.autograd.grad(model(x).square().sum(), model[0].weight)[0]
    capture = ActivationCapture(model, CapturePolicy.lossless())
    with capture.record({}) as rec:
        out = model(x)
    packed = [e.packed() for e in rec._entries if isinstance(e.packed(), PoolIndices)]
    assert len(packed) == 1 and packed[0].codes.dtype == torch.uint8
    got = torch.autograd.grad(out.square().sum(), model[0].weight)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_indices_pack_and_unpack_a_few_samples_at_a_time(monkeypatch, channels_last):
    """NOTE [Pool indices]: written as whole-tensor expressions, packing and its round-trip
    check held up to nine int64 buffers of the indices' size at once, the peak of a max-pooled
    stem's step. In parts of one sample: the codes plus two buffers of one sample's size."""
    monkeypatch.setattr(pool_indices, "_PART", 1 << 14)   # one sample a part here
    x = torch.randn(8, 16, 56, 56)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    geometry = pool_geometry((x, 3, 2, 1), {})
    packed = pack_pool_indices(indices, geometry)   # warm: index helpers built once
    assert isinstance(packed, PoolIndices)
    restored = packed.unpack()
    assert torch.equal(restored, indices) and restored.stride() == indices.stride()
    size = tensor_bytes(indices)
    assert peak_allocated_bytes(lambda: pack_pool_indices(indices, geometry)) <= 0.5 * size
    assert peak_allocated_bytes(packed.unpack) <= 1.3 * size


def test_functional_linear_on_a_parameter_is_pruned_under_its_parameter_name():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.randn(6, 8))
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return F.linear(x.transpose(0, 1), self.proj) * self.scale

    model = nn.Sequential(Block())
    capture = ActivationCapture(model, CapturePolicy())
    with capture.record({"0.proj": 0.25, "0.scale": 0.5}) as rec:
        out = model(torch.randn(5, 4, 8))
    layers = rec.layers()
    assert layers["0.proj"].role == "weight_grad" and layers["0.proj"].kind == "linear"
    assert layers["0.scale"].role == "weight_grad" and layers["0.scale"].kind == "scale"
    assert capture.weight_of("0.proj") is model[0].proj
    out.sum().backward()


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0", "vit_b_16", "swin_t"])
def test_fp16_input_grad_policy_stays_close_to_plain_autograd(name):
    # as surgeon runs them: the lean norm, and enough pixels that batch statistics are sound
    model = convert_batchnorm(_family(name))
    x = torch.rand(4, 3, 64, 64) if name != "vit_b_16" else torch.rand(4, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, plain = _grads(model, x)
    model.load_state_dict(state)
    policy = CapturePolicy(value_dtype="fp32", selection="topk", input_grad="fp16")
    _, lossy = _grads(model, x, ActivationCapture(model, policy))
    # over all gradients together: some single ones are ~0 by symmetry (a norm's bias before
    # another norm), and there any rounding points them anywhere
    a = torch.cat([plain[k].flatten() for k in plain]).double()
    b = torch.cat([lossy[k].flatten() for k in plain]).double()
    assert float((a - b).norm() / a.norm()) < 0.02
