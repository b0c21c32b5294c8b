"""A step whose backward never runs (nothing selected, a non-finite loss, a meter's forward)
frees its graph: process memory stays flat over 100 of them (NOTE [No cycle through saved
tensors])."""

import copy
import gc

import psutil
import pytest
import torch

from surgeon_core.methods import args_for, get_method
from surgeon_core.models import cifar_resnet_by_name

MB = 2 ** 20


def _rss_growth(call, rounds=100):
    for _ in range(3):   # allocator and kernels settle first
        call()
    gc.collect()
    start = psutil.Process().memory_info().rss
    for _ in range(rounds):
        call()
    gc.collect()
    return psutil.Process().memory_info().rss - start


@pytest.fixture(scope="module")
def model(resnet20_weights):
    return cifar_resnet_by_name("resnet20", resnet20_weights)


def test_a_meters_forward_without_backward_leaks_nothing(model):
    method = get_method("tent")(copy.deepcopy(model), args_for("tent"))
    x = torch.rand(32, 3, 32, 32)
    cache = method.metered_forward(method._loss, x)[1]
    growth = _rss_growth(lambda: method.metered_forward(method._loss, x))
    assert cache > 10 * MB and growth < 10 * cache   # leaking would be 100 x the cache


@pytest.mark.parametrize("name, overrides, poison", [
    ("eata", {"margin": 0.0}, False),                        # no sample selected
    ("surgeon", {"consistency_weight": 0.0}, True),          # a non-finite loss
])
def test_a_step_that_skips_backward_leaks_nothing(model, name, overrides, poison):
    method = get_method(name)(copy.deepcopy(model), args_for(name, **overrides))
    x = torch.rand(32, 3, 32, 32)
    if poison:
        x[0, 0, 0, 0] = float("nan")
    result = method.step(x)
    assert not result.updated
    growth = _rss_growth(lambda: method.step(x))
    assert growth < 100 * MB, "%.0f MB over 100 skipped steps" % (growth / MB)
