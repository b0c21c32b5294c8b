import pytest
import torch

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.engine import EngineConfig, SparseBackprop, entropy
from surgeon_core.models import cifar_resnet_by_name, resnet20
from surgeon_core.norm import convert_batchnorm


def _entropy_loss(model, x):
    logits = model(x)
    return entropy(logits).mean(), logits


def test_lean_default_holds_under_a_tenth_of_full_backprop(resnet20_weights, cifar_test_small):
    x = cifar_test_small[0][:64]
    full = cifar_resnet_by_name("resnet20", resnet20_weights).train()
    capture = ActivationCapture(full, CapturePolicy(passthrough=True))
    with capture.record() as rec:
        held = _entropy_loss(full, x)
        full_bytes = rec.cache_bytes()
    del held
    lean = convert_batchnorm(cifar_resnet_by_name("resnet20", resnet20_weights)).train()
    engine = SparseBackprop(lean)
    for _ in range(2):
        report = engine.step(x, _entropy_loss)
        lean.zero_grad()
    assert report.cache_bytes < full_bytes / 10
    assert 0 < report.trained_layers < len(report.keep_ratios)
    assert report.paper_bytes > 0 and report.keep_ratios
    assert all(0.0 <= k <= 1.0 for k in report.keep_ratios.values())


def test_non_finite_loss_skips_backward():
    model = resnet20().train()
    engine = SparseBackprop(model)

    def nan_loss(m, x):
        logits = m(x)
        return logits.sum() * float("nan"), logits

    report = engine.step(torch.rand(4, 3, 32, 32), nan_loss)
    assert report.skipped
    assert all(p.grad is None for p in model.parameters())


def test_probe_changes_no_statistics_and_leaves_no_gradient():
    model = convert_batchnorm(resnet20()).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    SparseBackprop(model).probe(torch.rand(12, 3, 32, 32) * 3)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_the_dense_probe_runs_only_while_some_trained_layer_prunes(monkeypatch):
    """Only prunable trained layers read importance: with the convs frozen and 1-bit x_hat (the
    daemon's recipe) one probe learns the layers, and no step after it probes again."""
    probes = {}
    for trains_convs in (False, True):
        model = convert_batchnorm(resnet20(), xhat_bits=1).train().requires_grad_(trains_convs)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.requires_grad_(True)
        engine = SparseBackprop(model, EngineConfig(probe_every=2))
        calls = []
        monkeypatch.setattr(engine, "probe", lambda x, count=None, real=engine.probe: (
            calls.append(1), real(x, count)))
        for _ in range(4):
            engine.step(torch.rand(8, 3, 32, 32), _entropy_loss)
            model.zero_grad()
        probes[trains_convs] = len(calls)
    assert probes == {False: 1, True: 2}   # steps 0 and 2 under probe_every=2


def test_weights_are_unfrozen_after_a_step_that_skipped_layers():
    model = convert_batchnorm(resnet20()).train()
    engine = SparseBackprop(model)
    engine.step(torch.rand(8, 3, 32, 32), _entropy_loss)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_engine_settings_are_refused():
    with pytest.raises(ValueError, match="variant"):
        EngineConfig(variant="x")
    with pytest.raises(ValueError, match="budget"):
        EngineConfig(budget_bytes=0)
    with pytest.raises(ValueError, match="keep_floor"):
        EngineConfig(keep_floor=2.0)


def test_latest_gradient_importance_does_not_collapse_ratios(resnet20_weights, cifar_test_small):
    # layers pruned hard get smaller gradients; the ratios must not spiral down to the floor
    model = convert_batchnorm(cifar_resnet_by_name("resnet20", resnet20_weights)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine = SparseBackprop(model)
    means = []
    for i in range(8):
        report = engine.step(cifar_test_small[0][i * 32:(i + 1) * 32], _entropy_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        means.append(sum(report.keep_ratios.values()) / len(report.keep_ratios))
    assert min(means[4:]) > 0.5 * means[0]
    assert engine.steps == 8


def test_overall_keep_weights_layers_by_their_prunable_values():
    model = convert_batchnorm(resnet20()).train()
    static = SparseBackprop(model, EngineConfig(fixed_keep=0.3)).step(
        torch.rand(8, 3, 32, 32), _entropy_loss)
    assert static.overall_keep == pytest.approx(0.3)
    engine = SparseBackprop(model)
    report = engine.step(torch.rand(8, 3, 32, 32), _entropy_loss)
    sizes = engine._numel
    expected = (sum(report.keep_ratios[n] * v for n, v in sizes.items())
                / sum(sizes.values()))
    assert report.overall_keep == pytest.approx(expected)
    assert report.overall_keep != pytest.approx(
        sum(report.keep_ratios.values()) / len(report.keep_ratios))
