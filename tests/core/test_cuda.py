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


def _surgeon_on_cuda(**overrides):
    from surgeon_core.methods import args_for, get_method

    torch.manual_seed(0)
    model = resnet20().cuda()
    return get_method("surgeon")(model, args_for("surgeon", **overrides))


def test_a_replayed_step_updates_as_its_eager_run():
    """NOTE [Captured step]: without augmentation the replays and the same step run eagerly
    land on the same weights; one capture, then replays."""
    from surgeon_core.capturable import CapturedStep

    options = dict(consistency_weight=0.0, margin=1.0, cuda_graph=True)
    graphed, eager = _surgeon_on_cuda(**options), _surgeon_on_cuda(**options)
    eager.captured = CapturedStep(eager, replay=False)
    torch.manual_seed(1)
    batches = [torch.rand(16, 3, 32, 32, device="cuda") for _ in range(8)]
    for x in batches:
        got, expected = graphed.step(x), eager.step(x)
        assert got.updated == expected.updated
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-3, atol=1e-4)
    assert graphed.captured.reason is None and graphed.captured.failed is None
    assert graphed.captured.captures == 1 and graphed.captured.replays >= 4
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    assert graphed.updates == eager.updates


def test_replays_draw_new_augmentations_and_skip_a_non_finite_batch():
    method = _surgeon_on_cuda(cuda_graph=True)
    x = torch.rand(16, 3, 32, 32, device="cuda")
    losses = [method.step(x).loss for _ in range(6)]
    assert method.captured.captures == 1 and method.captured.replays >= 3
    assert len(set(losses[-3:])) == 3   # the consistency loss's draws change at each replay
    weights = [p.detach().clone() for p in method.model.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    result = method.step(bad)
    assert not result.updated and method.captured.replays >= 4
    assert all(torch.equal(a, b) for a, b in zip(weights, method.model.parameters()))
    assert method.step(x).updated


def test_a_reset_and_a_checkpoint_load_capture_anew():
    method = _surgeon_on_cuda(cuda_graph=True)
    x = torch.rand(16, 3, 32, 32, device="cuda")
    for _ in range(4):
        method.step(x)
    state = method.state_dict()
    method.reset()
    for _ in range(4):
        method.step(x)
    method.load_state_dict(state)
    assert method.step(x).updated and method.captured.captures >= 2
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
