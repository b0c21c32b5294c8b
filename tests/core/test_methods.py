import copy
import math

import pytest
import torch

from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.data.corruptions import corrupt
from surgeon_core.methods import UnknownMethod, args_for, get_method, list_methods
from surgeon_core.models import cifar_resnet_by_name

FAST = {"cotta": {"augmentations": 2}, "eata+fisher": {"fisher_images": 128}}


@pytest.fixture(scope="module")
def base(resnet20_weights, tmp_path_factory):
    from surgeon_core.bench.ecotta_warmup import WarmupSettings, warm_up

    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    images, labels = load_cifar10("train", limit=128)   # a short warm-up, made for these weights
    out = tmp_path_factory.mktemp("ecotta") / "warmup.pt"
    warm_up(copy.deepcopy(model), to_tensor(images), torch.from_numpy(labels), out,
            WarmupSettings(batch_size=32, max_iterations=4))
    FAST["ecotta"] = {"warmup": str(out)}
    return model


@pytest.fixture(scope="module")
def noisy():
    images, labels = load_cifar10("test", limit=256)
    return to_tensor(corrupt(images, "gaussian_noise", 5)), torch.from_numpy(labels)


def _build(name, base, **overrides):
    return get_method(name)(copy.deepcopy(base), args_for(name, **{**FAST.get(name, {}),
                                                                   **overrides}))


def _stream_error(method, x, y, batch=64):
    wrong = 0
    for i in range(0, len(x), batch):
        result = method.step(x[i:i + batch])
        assert result.logits.shape == (len(x[i:i + batch]), 10)
        wrong += int((result.logits.argmax(1) != y[i:i + batch]).sum())
    return 100.0 * wrong / len(x)


def test_every_method_is_registered():
    assert list_methods() == ["bn", "cotta", "eata", "eata+fisher", "ecotta", "mecta", "rdumb",
                              "source", "static", "surgeon", "tent"]
    with pytest.raises(UnknownMethod, match="known: bn, cotta"):
        get_method("magic")


@pytest.mark.parametrize("name", list_methods())
def test_runs_end_to_end_and_reset_restores_the_source_exactly(name, base, noisy):
    method = _build(name, base)
    source = {k: v.clone() for k, v in method.model.state_dict().items()}
    _stream_error(method, noisy[0][:128], noisy[1][:128])
    changed = any(not torch.equal(v, method.model.state_dict()[k]) for k, v in source.items())
    assert changed or name in ("source", "bn")
    method.reset()
    for k, v in source.items():
        assert torch.equal(v, method.model.state_dict()[k]), k
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
    if hasattr(method, "engine"):
        assert method.engine.steps == 0  # importance learnt on the old weights is dropped


@pytest.mark.parametrize("name", list_methods())
def test_priming_before_the_first_step_leaves_no_trace(name, base, noisy):
    """The forward and backward that pays the libraries' one-time allocations before the first
    step's meter (NOTE [Peak budget]) changes no weight, statistic or prediction."""
    primed, bare = _build(name, base), _build(name, base)
    getattr(bare, "inner", bare)._primed = True     # rdumb steps its inner method
    torch.manual_seed(1)
    first = primed.step(noisy[0][:32])
    torch.manual_seed(1)
    second = bare.step(noisy[0][:32])
    assert getattr(primed, "inner", primed)._primed
    assert torch.equal(first.logits, second.logits)
    for (key, mine), theirs in zip(primed.model.state_dict().items(),
                                   bare.model.state_dict().values()):
        assert torch.equal(mine, theirs), key


def test_bn_and_tent_beat_source_on_noise(base, noisy):
    errors = {n: _stream_error(_build(n, base), *noisy) for n in ("source", "bn", "tent")}
    assert errors["bn"] < errors["source"] - 15
    assert errors["tent"] <= errors["bn"] + 2


@pytest.mark.parametrize("name", [n for n in list_methods() if n not in ("source", "bn")])
def test_a_nan_batch_never_reaches_the_weights(name, base, noisy):
    method = _build(name, base)
    x = noisy[0][:32].clone()
    x[0, 0, 0, 0] = float("nan")
    method.step(x)
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
    method.step(noisy[0][32:64])  # and it keeps working afterwards
    assert all(torch.isfinite(p).all() for p in method.model.parameters())


@pytest.mark.parametrize("name, overrides", [("eata", {"margin": 0.0}),
                                             ("surgeon", {"margin": 0.0, "consistency_weight": 0})])
def test_an_empty_selection_updates_nothing(name, overrides, base, noisy):
    method = _build(name, base, **overrides)
    before = {k: v.clone() for k, v in method.model.state_dict().items() if v.is_floating_point()}
    result = method.step(noisy[0][:32])
    assert result.selected == 0 and not result.updated
    params = dict(method.model.named_parameters())
    for k in params:
        assert torch.equal(params[k], before[k]), k


def test_surgeon_holds_a_fraction_of_tents_cache(base, noisy):
    tent = _build("tent", base).step(noisy[0][:64])
    surgeon = _build("surgeon", base, consistency_weight=0).step(noisy[0][:64])
    assert surgeon.cache_bytes < tent.cache_bytes / 5


def test_bad_method_arguments_are_refused():
    with pytest.raises(ValueError, match="params"):
        args_for("surgeon", params="everything")
    with pytest.raises(TypeError):
        args_for("tent", learning_rate=1.0)
    assert math.isclose(args_for("surgeon", params="bn").learning_rate(), 1e-3)


def _layer_norm_model():
    from .models_zoo import small_vit

    torch.manual_seed(0)
    model = small_vit()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)   # torchvision starts it at zero
    return model


@pytest.mark.parametrize("name", ["tent", "surgeon", "eata"])
def test_methods_adapt_layer_norm_models(name, noisy):
    model = _layer_norm_model()
    method = get_method(name)(copy.deepcopy(model), args_for(name, margin=1.0) if name != "tent"
                              else args_for(name))
    trained = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trained and all(".ln" in n or n.startswith("encoder.ln") for n in trained), trained
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    assert method.step(noisy[0][:16]).updated
    moved = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trained


def test_norm_free_models_are_refused_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ValueError, match="normalisation"):
        get_method("tent")(copy.deepcopy(model), args_for("tent"))
    with pytest.raises(ValueError, match="params=norm or all"):
        get_method("surgeon")(copy.deepcopy(model), args_for("surgeon"))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        get_method("mecta")(copy.deepcopy(model), args_for("mecta"))


def test_dropout_is_off_while_adapting(noisy):
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    method = get_method("surgeon")(mobilenet_v2(num_classes=10),
                                   args_for("surgeon", lr=1e-12, statistics="batch"))
    x = noisy[0][:8]
    first, second = method.step(x).logits, method.step(x).logits
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)   # no dropout draws


def test_surgeon_can_normalise_with_running_statistics(base, noisy):
    from surgeon_core.norm import RunningStatNorm2d

    method = _build("surgeon", base, statistics="running", gate_scale=None, momentum=0.05)
    norms = [m for m in method.model.modules() if isinstance(m, RunningStatNorm2d)]
    assert norms and all(m.statistics == "running" and m.gate_scale is None
                         and m.momentum == 0.05 for m in norms)
    before = norms[0].running_mean.clone()
    method.step(noisy[0][:32])
    moved = (norms[0].running_mean - before).abs().max()
    assert 0 < float(moved)
    with pytest.raises(ValueError, match="statistics"):
        args_for("surgeon", statistics="median")
    split = _build("surgeon", base, running_after=7)
    kinds = [m.statistics for m in split.model.modules() if isinstance(m, RunningStatNorm2d)]
    assert kinds == ["batch"] * 7 + ["running"] * (len(kinds) - 7)


def test_the_anchor_pulls_trained_weights_back_toward_the_source(base, noisy):
    """anchor a: after each update w <- w + a (w_source - w); statistics are left alone."""
    x = noisy[0][:32]
    moved = {}
    for anchor in (0.0, 0.5):
        torch.manual_seed(0)
        method = get_method("surgeon")(copy.deepcopy(base), args_for("surgeon", anchor=anchor,
                                                                    anchor_ramp=0, margin=1.0))
        assert method.step(x).updated
        source = method._source["model"]
        moved[anchor] = sum(float((p.detach() - source[n]).abs().sum())
                            for n, p in method.model.named_parameters() if p.requires_grad)
    assert moved[0.0] > 0
    assert abs(moved[0.5] - 0.5 * moved[0.0]) < 0.05 * moved[0.0]


def test_the_anchor_ramps_in_over_its_first_updates_and_again_after_a_reset(base, noisy):
    """anchor_ramp R: the k-th update since the source pulls back anchor * min(1, k / R)."""
    method = get_method("surgeon")(copy.deepcopy(base), args_for("surgeon", anchor=0.5,
                                                                anchor_ramp=4, margin=1.0))
    rates = []
    for _ in range(5):
        assert method.step(noisy[0][:32]).updated
        rates.append(method.anchor_rate())
    assert rates == [0.125, 0.25, 0.375, 0.5, 0.5]
    saved = copy.deepcopy(method.state_dict())
    method.reset()
    assert method.updates == 0 and method.anchor_rate() == 0.0
    method.load_state_dict(saved)   # a checkpoint carries where the ramp stood
    assert method.updates == 5
    with pytest.raises(ValueError, match="anchor_ramp"):
        args_for("surgeon", anchor_ramp=-1)


def test_all_finite_finds_one_bad_value_among_many_tensors():
    from surgeon_core.methods.base import all_finite

    tensors = [torch.randn(64, 3), torch.randn(5, dtype=torch.float64), torch.zeros(7)]
    assert all_finite(tensors)
    for bad in (float("nan"), float("inf"), float("-inf")):
        spoiled = [t.clone() for t in tensors]
        spoiled[1][3] = bad
        assert not all_finite(spoiled)
