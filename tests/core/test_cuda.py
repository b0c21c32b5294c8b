"""On a GPU the saving must show in torch.cuda's own counters, not only in our meter."""

import pytest
import torch

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.engine import entropy
from surgeon_core.models import resnet20
from surgeon_core.norm import convert_batchnorm

pytestmark = pytest.mark.gpu


def _held_after_forward(model, x, capture=None, keep=None):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    if capture is None:
        loss = entropy(model(x)).mean()
    else:
        with capture.record(keep or {}) as rec:
            loss = entropy(model(x)).mean()
        metered = rec.cache_bytes()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    return held, (metered if capture is not None else None)


def test_allocated_memory_drops_with_pruning_and_matches_the_meter():
    x = torch.rand(128, 3, 32, 32, device="cuda")
    plain = resnet20().cuda().train()
    dense_held, _ = _held_after_forward(plain, x)
    lean = convert_batchnorm(resnet20()).cuda().train()
    capture = ActivationCapture(lean, CapturePolicy())
    keep = {name: 0.1 for name, _ in lean.named_modules()}
    sparse_held, metered = _held_after_forward(lean, x, capture, keep)
    assert sparse_held < dense_held / 5
    assert metered <= sparse_held + 2**20  # the meter never under-reports what CUDA holds
    assert sparse_held - metered < 0.1 * dense_held


def test_keep_one_lossless_matches_plain_autograd_on_cuda(monkeypatch):
    # TF32 and autotuned algorithms would differ between the two runs, not our storage
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = resnet20().cuda().train()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    entropy(model(x)).mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    capture = ActivationCapture(model, CapturePolicy.lossless())
    with capture.record():
        loss = entropy(model(x)).mean()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)
