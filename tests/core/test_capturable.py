"""The captured step (NOTE [Captured step]) run eagerly on the CPU: what a CUDA graph would
record reads nothing on the host, writes every state where it lies, and updates as the eager
step does. The capture and replay themselves are in test_cuda.py (a GPU only)."""

import copy

import pytest
import torch

from surgeon_core.capturable import CapturedStep, masked_adam
from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.data.corruptions import corrupt
from surgeon_core.methods import args_for, get_method
from surgeon_core.methods.augment import jitter_order
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.opcount import OpCounter


@pytest.fixture(scope="module")
def base(resnet20_weights):
    return cifar_resnet_by_name("resnet20", resnet20_weights)


@pytest.fixture(scope="module")
def frames():
    images, _ = load_cifar10("test", limit=96)
    return to_tensor(corrupt(images, "fog", 3))


def _surgeon(base, **overrides):
    return get_method("surgeon")(copy.deepcopy(base), args_for("surgeon", **overrides))


def _warm(method, frames):
    """Two eager steps: the probe and the optimizer's state, as a daemon's first steps."""
    for i in range(2):
        method.step(frames[i * 16:(i + 1) * 16])


def _trained(method):
    return [p.detach().clone() for p in method.optimizer.param_groups[0]["params"]]


def _state_tensors(method):
    tensors = list(method.optimizer.param_groups[0]["params"])
    for p in method.optimizer.param_groups[0]["params"]:
        tensors.extend(method.optimizer.state[p].values())
    return tensors + list(method.model.buffers())


@pytest.mark.parametrize("overrides", [{}, {"xhat_bits": 0, "fixed_keep": 0.2},
                                       {"xhat_bits": 2, "params": "all", "fixed_keep": 0.3}])
def test_the_step_reads_nothing_on_the_host_and_writes_every_state_in_place(base, frames,
                                                                           overrides):
    """The daemon's recipe, fixed pruning ratios (sync-free packing: NOTE [Sync-free packing])
    and every weight trained through a 2-bit x_hat."""
    method = _surgeon(base, **overrides)
    _warm(method, frames)
    captured = CapturedStep(method, replay=False)
    captured.step(frames[32:48])   # moves Adam's step counts where the device's would be
    addresses = [t.data_ptr() for t in _state_tensors(method)]
    before = _trained(method)
    with OpCounter() as ops:
        outputs = captured._run(frames[48:64], captured._ratios(frames[48:64]))
    assert ops.host_reads == {}
    assert [t.data_ptr() for t in _state_tensors(method)] == addresses
    assert bool(outputs.applied)
    assert any(not torch.equal(a, b) for a, b in zip(before, _trained(method)))
    result = captured._result(outputs, {})
    assert result.updated and result.logits.shape == (16, 10) and result.cache_bytes > 0


@pytest.mark.parametrize("overrides", [{"consistency_weight": 0.0}, {}])
def test_the_captured_step_updates_as_the_eager_step_does(base, frames, overrides):
    """The same batches and (with consistency) the same augmentation draws: the same weights,
    statistics, Adam state and anchor."""
    eager, captured_method = _surgeon(base, **overrides), _surgeon(base, **overrides)
    _warm(eager, frames)
    _warm(captured_method, frames)
    captured = CapturedStep(captured_method, replay=False)
    for i in range(2, 6):
        batch = frames[i * 16:(i + 1) * 16]
        torch.manual_seed(i)
        eager._device_draws = jitter_order()   # eager draws on the device too
        expected = eager.step(batch)
        torch.manual_seed(i)
        got = captured.step(batch)   # draws in that order when not captured
        assert got.updated == expected.updated and got.selected == expected.selected
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert torch.allclose(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert captured_method.updates == eager.updates == 6
    for (name, a), b in zip(eager.model.state_dict().items(),
                            captured_method.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name
    for p, q in zip(eager.optimizer.param_groups[0]["params"],
                    captured_method.optimizer.param_groups[0]["params"]):
        for field in ("exp_avg", "exp_avg_sq", "step"):
            # the update's rounding differs (1e-7 in a weight), and a 1-bit x_hat code of a
            # value that near 0 can flip: the next gradients differ up to 0.2 % of the largest
            a, b = eager.optimizer.state[p][field], captured_method.optimizer.state[q][field]
            assert torch.allclose(a.float(), b.float(), rtol=1e-4,
                                  atol=5e-3 * float(a.abs().max())), field


def test_a_non_finite_batch_changes_no_weight_and_no_optimizer_state(base, frames):
    method = _surgeon(base)
    _warm(method, frames)
    captured = CapturedStep(method, replay=False)
    captured.step(frames[32:48])
    weights = _trained(method)
    state = copy.deepcopy(method.optimizer.state_dict()["state"])
    bad = frames[48:64].clone()
    bad[0, 0, 0, 0] = float("nan")
    result = captured.step(bad)
    assert not result.updated and method.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(weights, _trained(method)))
    for index, fields in state.items():
        for field, value in fields.items():
            assert torch.equal(method.optimizer.state_dict()["state"][index][field], value)
    assert captured.step(frames[64:80]).updated   # and it learns again afterwards
    assert all(torch.isfinite(p).all() for p in method.model.parameters())


def test_nothing_selected_and_no_consistency_updates_nothing(base, frames):
    method = _surgeon(base, margin=0.0, consistency_weight=0.0)
    _warm(method, frames)
    method.optimizer.state.clear()
    captured = CapturedStep(method, replay=False)
    assert captured.step(frames[:16]) is None and "no state" in captured.reason
    eager = _surgeon(base, consistency_weight=0.0)   # state from steps that selected some
    _warm(eager, frames)
    eager.args = args_for("surgeon", margin=0.0, consistency_weight=0.0)
    captured = CapturedStep(eager, replay=False)
    weights = _trained(eager)
    result = captured.step(frames[32:48])
    assert result.selected == 0 and not result.updated
    assert all(torch.equal(a, b) for a, b in zip(weights, _trained(eager)))


def test_dynamic_ratios_and_other_optimizers_run_eagerly_with_a_reason(base, frames):
    method = _surgeon(base, xhat_bits=0)   # x_hat pruned at importance-driven ratios
    _warm(method, frames)
    assert method.engine.static_ratios(frames[:16], method._forward_loss) is None
    assert CapturedStep(method, replay=False).step(frames[32:48]) is None
    method = _surgeon(base, xhat_bits=0, fixed_keep=0.2)   # the static-sparsity baseline
    _warm(method, frames)
    ratios = method.engine.static_ratios(frames[:16], method._forward_loss)
    assert ratios and set(ratios.values()) == {0.2}
    assert "CUDA" in CapturedStep(method).why_not(frames[:16])
    method = _surgeon(base)
    _warm(method, frames)
    method.optimizer.param_groups[0]["weight_decay"] = 1e-4
    assert "weight decay" in CapturedStep(method, replay=False).why_not(frames[:16])


def test_a_changed_option_or_replaced_optimizer_state_changes_the_capture_key(base, frames):
    import dataclasses

    method = _surgeon(base)
    _warm(method, frames)
    captured = CapturedStep(method, replay=False)
    captured.step(frames[32:48])
    x = frames[48:64]
    ratios = captured._ratios(x)
    key = captured.key(x, ratios)
    assert captured.key(x, ratios) == key
    method.optimizer.param_groups[0]["lr"] = 1e-5   # written before each replay: same key
    assert captured.key(x, ratios) == key
    method.args = dataclasses.replace(method.args, margin=0.3)
    assert captured.key(x, ratios) != key
    key = captured.key(x, ratios)
    method.optimizer.load_state_dict(copy.deepcopy(method.optimizer.state_dict()))
    assert captured.key(x, ratios) != key
    assert captured.key(frames[:8], ratios) != captured.key(x, ratios)


def test_masked_adam_is_torchs_adam_when_on_and_still_when_off():
    torch.manual_seed(0)
    params = [torch.randn(5, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    mine = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-2, foreach=True)
    states = [{"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
               "exp_avg_sq": torch.zeros_like(p)} for p in mine]
    lr = torch.tensor(1e-2)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        on = torch.tensor(float(step != 2))   # the third step is skipped
        if step != 2:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        masked_adam(mine, [g if step != 2 else g * float("nan") for g in grads], states, on,
                    lr, (0.9, 0.999), 1e-8)
    for p, q in zip(params, mine):
        assert torch.allclose(p.detach(), q, rtol=1e-5, atol=1e-7)
    assert float(states[0]["step"]) == 4.0


def test_captures_that_never_last_turn_capturing_off(base, frames, monkeypatch):
    """Input shapes that change every step would capture every step, each a step's cost more;
    the third capture in a row replaced before 4 replays turns it off. The capture is faked:
    only its bookkeeping runs on a CPU."""
    method = _surgeon(base)
    _warm(method, frames)
    captured = CapturedStep(method)
    monkeypatch.setattr(captured, "why_not", lambda x: None)

    def fake_capture(x, ratios):
        captured._graph, captured._key, captured.replays = object(), captured.key(x, ratios), 0
        captured.captures += 1
        return "captured"

    monkeypatch.setattr(captured, "_capture", fake_capture)
    for size in (16, 12, 16):
        assert captured.step(frames[:size]) == "captured"
    assert captured.failed is None and captured.captures == 3
    assert captured.step(frames[:12]) is None and "in a row" in captured.failed


def _recorded_and_eager(base, frames, **overrides):
    """Two methods after the same two eager steps: one step of the first recorded as a CUDA
    graph would capture it (``Recording``), the second to run the same steps eagerly."""
    from .replay import Recording

    graphed, eager = _surgeon(base, **overrides), _surgeon(base, **overrides)
    for method in (graphed, eager):
        _warm(method, frames)
    graphed_step, eager_step = CapturedStep(graphed, replay=False), \
        CapturedStep(eager, replay=False)
    static = frames[32:48].clone()
    ratios = graphed_step._ratios(static)
    for step in (graphed_step, eager_step):
        step._prepare(static)
    graphed_step._write_scalars()
    torch.manual_seed(2)   # the same augmentation draws
    with OpCounter(), Recording() as graph:   # the GPU's paths, as on a GPU
        outputs = graphed_step._run(static, ratios, jitter_order(), scalars=False)
    graphed_step._result(outputs, ratios)
    torch.manual_seed(2)
    with OpCounter():
        eager_step._result(eager_step._run(static, ratios, jitter_order()), ratios)
    return graph, static, outputs, graphed_step, eager_step, ratios


def _replayed(graph, static, outputs, step, ratios, batch):
    static.copy_(batch)
    step._write_scalars()
    graph.replay()
    return step._result(outputs, ratios)


@pytest.mark.parametrize("overrides", [{}, {"xhat_bits": 0, "fixed_keep": 0.2}])
def test_replays_of_the_recorded_step_follow_its_eager_runs(base, frames, overrides):
    """Replayed on new batches with no Python in between (a CUDA graph's rules, on a CPU):
    every state the step updates is read back where it lies, and the augmentation redraws.
    A shift gate that rebound its count instead of updating it in place diverged here."""
    graph, static, outputs, graphed_step, eager_step, ratios = _recorded_and_eager(
        base, frames, **overrides)
    for i in range(3, 6):
        batch = frames[i * 16:(i + 1) * 16]
        torch.manual_seed(i)
        got = _replayed(graph, static, outputs, graphed_step, ratios, batch)
        torch.manual_seed(i)
        with OpCounter():
            expected = eager_step._result(
                eager_step._run(batch, ratios, jitter_order()), ratios)
        assert got.updated and expected.updated
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert torch.allclose(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert graphed_step.method.updates == eager_step.method.updates == 6
    for (name, a), b in zip(eager_step.method.model.state_dict().items(),
                            graphed_step.method.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_a_replayed_non_finite_batch_changes_nothing_and_the_next_replay_learns(base, frames):
    graph, static, outputs, graphed_step, _, ratios = _recorded_and_eager(base, frames)
    method = graphed_step.method
    weights, state = _trained(method), copy.deepcopy(method.optimizer.state_dict()["state"])
    bad = frames[48:64].clone()
    bad[3, 1, 4, 4] = float("inf")
    result = _replayed(graph, static, outputs, graphed_step, ratios, bad)
    assert not result.updated
    assert all(torch.equal(a, b) for a, b in zip(weights, _trained(method)))
    for index, fields in state.items():
        for field, value in fields.items():
            assert torch.equal(method.optimizer.state_dict()["state"][index][field], value)
    assert _replayed(graph, static, outputs, graphed_step, ratios, frames[64:80]).updated
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
