import math

import pytest
import torch
from torch import nn

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.engine import EngineConfig, SparseBackprop, entropy
from surgeon_core.errors import BudgetExceeded
from surgeon_core.importance import (CacheProfile, gradient_importance, keep_ratios,
                                     memory_importance, solve_budget)
from surgeon_core.models import resnet20
from surgeon_core.norm import convert_batchnorm
from surgeon_core.opcount import OpCounter


def test_memory_importance_is_log_of_total_over_size():
    m = memory_importance({"a": 100, "b": 300})
    assert m["a"] == pytest.approx(math.log(4.0)) and m["b"] == pytest.approx(math.log(4 / 3))


def test_gradient_importance_is_rms_keyed_by_name():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    weights = {"0": model[0].weight}
    assert gradient_importance(weights.get, ["0"]) == {"0": pytest.approx(2.5)}


def test_gradient_importance_of_many_layers_costs_one_norm_operator():
    """Issue 15: a layer's norm was two operators; all layers' now come from one."""
    layers = {str(i): nn.Parameter(torch.randn(4, i + 1)) for i in range(12)}
    for weight in layers.values():
        weight.grad = torch.randn_like(weight)
    with OpCounter() as ops:
        scores = gradient_importance(layers.get, list(layers) + ["absent"])
    assert ops.kernels <= 2, ops.by_name     # the norms, and their stack for one read
    for name, weight in layers.items():
        rms = float(weight.grad.pow(2).mean().sqrt())
        assert scores[name] == pytest.approx(rms, rel=1e-5)
    assert "absent" not in scores


def test_paper_variant_min_max_normalises_both_terms():
    grad = {"a": 1.0, "b": 2.0, "c": 3.0}
    mem = {"a": 3.0, "b": 2.0, "c": 1.0}
    ratios = keep_ratios(grad, mem, "paper")
    # Norm(G) = 0, .5, 1; Norm(M) = 1, .5, 0 -> I = 0, .25, 0 -> keep I / max I
    assert ratios == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_published_variant_uses_raw_product_and_the_best_layer_keeps_all():
    ratios = keep_ratios({"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 1.0}, "published")
    assert ratios == {"a": 1.0, "b": pytest.approx(2 / 3)}


def test_floor_applies_and_layers_are_matched_by_name_not_position():
    ratios = keep_ratios({"y": 1.0, "x": 2.0}, {"x": 1.0, "y": 1.0, "z": 5.0}, "paper", floor=0.1)
    assert set(ratios) == {"x", "y"}  # z has no gradient score
    assert ratios["y"] == pytest.approx(0.1) and ratios["x"] == 1.0


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        keep_ratios({"a": 1.0}, {"a": 1.0}, "magic")


def test_solver_refuses_non_positive_budgets_and_says_when_the_floor_cannot_fit():
    profile = CacheProfile(1000.0, {"a": 10_000.0}, 2)
    with pytest.raises(ValueError):
        solve_budget(profile, {"a": 1.0}, 0, 4)
    with pytest.raises(BudgetExceeded, match="lower keep_floor"):
        solve_budget(profile, {"a": 1.0}, 5000, 4, floor=0.5)


def _entropy_loss(model, x):
    logits = model(x)
    return entropy(logits).mean(), logits


def _dense_cache(model, x):
    capture = ActivationCapture(model, CapturePolicy(passthrough=True))
    with capture.record() as rec:
        held = _entropy_loss(model, x)
        dense = rec.cache_bytes()
    del held
    capture.close()
    return dense


@pytest.mark.parametrize("lean, sync_free", [(True, False), (False, False), (True, True)],
                         ids=["lean_norm", "batchnorm", "lean_norm_sync_free"])
def test_budgets_from_5_to_100_percent_are_never_exceeded_and_cache_grows(lean, sync_free,
                                                                         resnet20_weights):
    from surgeon_core.models import cifar_resnet_by_name

    base = cifar_resnet_by_name("resnet20", resnet20_weights).train()
    model = convert_batchnorm(base) if lean else base
    x = torch.rand(16, 3, 32, 32)
    dense = _dense_cache(model, x)
    fractions = (0.05, 0.1, 0.25, 0.5, 1.0) if lean else (0.55, 0.7, 1.0)
    measured = []
    for fraction in fractions:
        policy = CapturePolicy(input_grad="exact", sync_free=sync_free)
        config = EngineConfig(policy=policy, budget_bytes=int(fraction * dense))
        engine = SparseBackprop(model, config)
        for _ in range(3):
            report = engine.step(x, _entropy_loss)
            model.zero_grad(set_to_none=True)
            assert report.cache_bytes <= fraction * dense, (fraction, report.cache_bytes, dense)
        measured.append(report.cache_bytes)
        engine.capture.close()
    # non-decreasing (once every ratio reaches 1 the cache saturates, up to data noise)
    assert all(b >= a * 0.99 for a, b in zip(measured, measured[1:])), measured
    # exact BatchNorm inputs are a fixed ~half of the cache, so only the rest can grow
    assert measured[-1] > (2.0 if lean else 1.01) * measured[0]


def test_a_budget_below_the_floor_raises_before_any_forward():
    model = resnet20().train()
    engine = SparseBackprop(model, EngineConfig(budget_bytes=1000, keep_floor=0.5))
    with pytest.raises(BudgetExceeded):
        engine.step(torch.rand(4, 3, 32, 32), _entropy_loss)


def test_lowering_the_budget_shrinks_the_next_step():
    model = convert_batchnorm(resnet20()).train()
    x = torch.rand(8, 3, 32, 32)
    engine = SparseBackprop(model, EngineConfig(budget_bytes=4 * 2**20))
    first = engine.step(x, _entropy_loss).cache_bytes
    engine.set_budget(1 * 2**20)
    second = engine.step(x, _entropy_loss).cache_bytes
    assert second <= 1 * 2**20 < first
    with pytest.raises(ValueError):
        engine.set_budget(-5)
