import pytest
import torch

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.methods import args_for, get_method
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.norm import RunningStatNorm2d
from surgeon_core.sparsity import dequantize_standard, quantize_standard

from .allocations import peak_allocated_bytes, tensor_bytes


def test_standard_codes_are_packed_bits_with_lloyd_max_levels():
    x = torch.randn(1000)
    sign, big = quantize_standard(x, 1)
    assert big is None and sign.numel() == 125 and sign.dtype == torch.uint8
    one = dequantize_standard(sign, None, 1000, torch.float32)
    assert torch.equal(one.sign(), x.sign())
    assert torch.allclose(one.abs(), torch.full_like(one, 0.7979))
    sign, big = quantize_standard(x, 2)
    two = dequantize_standard(sign, big, 1000, torch.float32)
    assert torch.equal(two.abs() > 1.0, x.abs() > 0.9816)
    # 2 bits track the values better than 1, which tracks them better than nothing
    assert (two - x).pow(2).mean() < 0.15 < (one - x).pow(2).mean() < 0.45 < x.pow(2).mean()
    with pytest.raises(ValueError, match="bits"):
        quantize_standard(x, 3)


def _norm_grads(bits, freeze_gamma=False):
    torch.manual_seed(0)
    norm = RunningStatNorm2d(8, xhat_bits=bits).train()
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(not freeze_gamma)
    x = (torch.randn(16, 8, 6, 6) * 3 + 1).requires_grad_(True)
    target = torch.randn(16, 8, 6, 6)
    capture = ActivationCapture(norm, CapturePolicy())
    with capture.record({"": 1.0}) as rec:
        y = norm(x)
        cache = rec.cache_bytes()
    (y * target).sum().backward()
    return x.grad, norm.weight.grad, cache


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("bits, min_cos, code_bytes", [(1, 0.75, 16 * 8 * 36 // 8),
                                                       (2, 0.9, 16 * 8 * 36 // 4)])
def test_quantised_x_hat_costs_its_bits_and_keeps_gradients_close(bits, min_cos, code_bytes):
    exact_x, exact_w, exact_cache = _norm_grads(0)
    grad_x, grad_w, cache = _norm_grads(bits)
    assert cache < exact_cache / 8 and code_bytes <= cache <= code_bytes + 256
    assert _cosine(grad_w, exact_w) > min_cos
    assert _cosine(grad_x, exact_x) > 0.95


def test_two_bit_codes_hold_one_float_temporary():
    """The magnitude bit was the difference's magnitude, a second float copy of the input."""
    x = torch.randn(8, 16, 32, 32)
    mean, invstd = torch.zeros(1, 16, 1, 1), torch.ones(1, 16, 1, 1)
    quantize_standard(x, 2, mean, invstd)
    peak = peak_allocated_bytes(lambda: quantize_standard(x, 2, mean, invstd))
    assert peak <= 1.5 * tensor_bytes(x), peak / tensor_bytes(x)


def test_a_frozen_gamma_still_gets_the_x_hat_correction():
    exact_x, _, _ = _norm_grads(0)                     # gamma trained: exact correction
    pruned_x, _, _ = _norm_grads(0, freeze_gamma=True)   # nothing cached: mean correction only
    signed_x, _, _ = _norm_grads(1, freeze_gamma=True)
    assert _cosine(signed_x, exact_x) > _cosine(pruned_x, exact_x)


def test_surgeon_default_trains_every_norm_layer_under_a_tenth_of_full(resnet20_weights,
                                                                       cifar_test_small):
    x = cifar_test_small[0][:64]
    full = cifar_resnet_by_name("resnet20", resnet20_weights).train()
    with ActivationCapture(full, CapturePolicy(passthrough=True)).record() as rec:
        out = full(x).sum()
        full_bytes = rec.cache_bytes()
    del out
    method = get_method("surgeon")(cifar_resnet_by_name("resnet20", resnet20_weights),
                                   args_for("surgeon", consistency_weight=0.0, margin=1.0))
    before = {n: p.detach().clone() for n, p in method.model.named_parameters() if p.requires_grad}
    result = method.step(x)
    assert result.updated and result.cache_bytes < full_bytes / 10
    moved = [n for n, p in method.model.named_parameters() if n in before
             and not torch.equal(p, before[n])]
    assert len(moved) == len(before)                   # no norm layer frozen by a keep ratio
