"""NOTE [Deferred backward constants]: a lean norm's backward-kernel constants are computed for
every norm of a model together when its forward ends, and equal the per-norm formulas."""

import torch
from torch import nn

from surgeon_core.backward_constants import BackwardConstants, compute_all
from surgeon_core.norm import RunningStatNorm2d, _LeanAffine, convert_batchnorm, split_statistics
from surgeon_core.opcount import OpCounter


def _vectors(count, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(width + i, generator=generator) + 0.5 for i in range(count)]


def test_many_norms_constants_cost_a_few_operators_and_equal_the_formulas():
    weights, invstds = _vectors(12, 4, 0), _vectors(12, 4, 1)
    means, variances, code_means = _vectors(12, 4, 2), _vectors(12, 4, 3), _vectors(12, 4, 4)
    scaled = [BackwardConstants(w, c) for w, c in zip(weights[:4], invstds[:4])]
    running = [BackwardConstants(w, None, var=v, eps=1e-3)
               for w, v in zip(weights[4:8], variances[4:8])]
    coded = [BackwardConstants(w, c, m, v, 1e-3, cm) for w, c, m, v, cm in
             zip(weights[8:], invstds[8:], means[8:], variances[8:], code_means[8:])]
    with OpCounter() as ops:
        compute_all(scaled + running + coded)
    assert ops.kernels <= 9, ops.by_name   # 8 where torch has a multi-tensor rsqrt; was 36
    for i, constants in enumerate(scaled):
        assert torch.equal(constants.values()[0], weights[i] * invstds[i])
        assert constants.values()[1:] == (None, None)
    for i, constants in enumerate(running, 4):
        torch.testing.assert_close(constants.values()[0],
                                   weights[i] * torch.rsqrt(variances[i] + 1e-3))
    for i, constants in enumerate(coded, 8):
        scale, mean, var = constants.values()
        torch.testing.assert_close(scale, weights[i] * invstds[i])
        torch.testing.assert_close(mean, (means[i] - code_means[i]) * invstds[i])
        torch.testing.assert_close(var, (variances[i] + 1e-3) * invstds[i].square())


def _daemon_like(depth=6):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    model = convert_batchnorm(nn.Sequential(*layers), xhat_bits=1).train()
    for m in model.modules():
        if not isinstance(m, (RunningStatNorm2d, nn.Sequential)):
            m.requires_grad_(False)
    return model


def _lean_nodes(output):
    """The autograd nodes of ``output``'s graph that carry backward constants."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "constants"):
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_a_models_constants_are_ready_when_its_forward_ends():
    model = _daemon_like()
    split_statistics(model, 3)
    out = model(torch.randn(8, 4, 6, 6))
    nodes = _lean_nodes(out)
    assert len(nodes) == 6 and not any(node.constants.pending for node in nodes)


def test_a_lagging_deep_norm_maps_its_codes_with_the_statistics_it_normalised_with():
    """With ``lag`` the deep norms normalise with the running statistics as they were, and
    their update waits in the queue: the constants must not read the moved ones."""
    model = _daemon_like()
    split_statistics(model, 3, lag=True)
    deep = [m for m in model.modules() if isinstance(m, RunningStatNorm2d)][3:]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in deep]
    out = model(torch.randn(8, 4, 6, 6) * 3 + 1)
    assert not torch.equal(deep[0].running_var, before[0][1])   # the update ran
    coded = [n for n in _lean_nodes(out) if n.constants.values()[1] is not None]
    assert len(coded) == 3
    for node, norm, (mean, var) in zip(reversed(coded), deep, before):
        _, kernel_mean, kernel_var = node.constants.values()
        code_invstd = node.constants.values()[0] / norm.weight.detach()
        torch.testing.assert_close(kernel_var, (var + norm.eps) * code_invstd.square())
        assert kernel_mean.shape == mean.shape


def test_a_function_outside_any_queue_computes_its_own_in_backward():
    x = torch.randn(16, 4, 6, 6)
    weight = torch.rand(4, requires_grad=True)
    mean, var = torch.zeros(4), torch.full((4,), 4.0)
    _LeanAffine.apply(x, weight, torch.zeros(4), mean, var, 1e-5, 0).sum().backward()
    expected = (x / torch.sqrt(torch.tensor(4.0 + 1e-5))).sum((0, 2, 3))
    torch.testing.assert_close(weight.grad, expected)


def test_a_forward_without_autograd_computes_no_backward_constants():
    """Serving: no backward will ask, so nothing is computed (three operators a norm before)."""
    model = _daemon_like().eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        model(x)
        with OpCounter() as ops:
            model(x)
    assert ops.by_name["native_batch_norm"] == 6
    assert not any(name.startswith("_foreach") or name in ("rsqrt", "mul")
                   for name in ops.by_name), ops.by_name
