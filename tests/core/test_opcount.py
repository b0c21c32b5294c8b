"""Operators dispatched per step (surgeon_core/opcount.py): each is a kernel launch on a GPU,
so the count is held here, on the CPU, where CI runs."""

import torch

from surgeon_core.bench.memory import run_memory_benchmark
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.opcount import OpCounter


def test_the_counter_sees_forward_and_backward_and_leaves_views_out():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU())
    x = torch.rand(4, 3, 16, 16)
    with OpCounter() as forward:
        y = model(x).sum()
    with OpCounter() as backward:
        y.backward()
    assert forward.by_name["convolution"] == 1 and backward.by_name["convolution_backward"] == 1
    assert backward.by_name["detach"] > 0 and backward.kernels < backward.total


def test_surgeons_operator_count_is_held(resnet20_weights):
    """Measured at batch 16 with every Adam on its foreach path (CUDA's default, so the count
    is a GPU's): full backprop 330, surgeon 1,897 (5.7x), the daemon's recipe 2,963 (9.0x;
    BENCHMARKS.md). The issue's aim is 2x; this holds the line until the packing is fused."""
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    results = {r.config: r for r in run_memory_benchmark(model, torch.rand(8, 3, 32, 32), 1)}
    assert 250 < results["full"].ops < 450
    assert results["surgeon"].ops_ratio < 6.2, results["surgeon"].ops
    assert results["daemon"].ops_ratio < 9.6, results["daemon"].ops
