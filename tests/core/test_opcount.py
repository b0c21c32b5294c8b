"""Operators dispatched per step (surgeon_core/opcount.py): each is a kernel launch on a GPU,
so the count is held here, on the CPU, where CI runs."""

import pytest
import torch

from surgeon_core.bench.memory import run_memory_benchmark
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.methods.surgeon import Surgeon, SurgeonArgs
from surgeon_core.norm import RunningStatNorm2d
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


def test_a_counter_takes_the_gpus_paths_unless_told_to_count_this_devices():
    from surgeon_core.opcount import gpu_path

    with OpCounter():
        assert gpu_path()
        with OpCounter(gpu_paths=False):
            assert gpu_path()      # an outer counter still wants the GPU's
    with OpCounter(gpu_paths=False):
        assert not gpu_path()
    assert not gpu_path()


def test_surgeons_operator_count_is_held(resnet20_weights):
    """Measured at batch 8 with every Adam on its foreach path and pruned tensors in the GPU's
    sync-free form (CUDA's defaults, so the count is a GPU's): full backprop 311, surgeon 901
    (2.9x; 927 before its value buffer went uncleared), the daemon's recipe 1,177 (3.8x) on
    torch 2.14. On the CPU's own paths surgeon's is 903 at this batch (its exact-count gather:
    NOTE [Exact-count gather]). The sync-free form counted 1,240
    (4.0x) before its packing was cut (NOTE [Sync-free packing]); the daemon counted 1,324
    (4.3x) before the norms' backward constants were computed together (NOTE [Deferred
    backward constants]); both were 4.8x and 6.3x before the running statistics were
    (BENCHMARKS.md). The issue's aim is 2x; this holds the line where this round left it."""
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    results = {r.config: r for r in run_memory_benchmark(model, torch.rand(8, 3, 32, 32), 1)}
    assert 250 < results["full"].ops < 450
    assert results["surgeon"].ops_ratio < 3.1, results["surgeon"].ops
    assert results["daemon"].ops_ratio < 3.9, results["daemon"].ops
    assert results["surgeon"].cpu_ops_ratio < 3.1, results["surgeon"].cpu_ops


@pytest.mark.parametrize("statistics,bits", [("batch", 1), ("running", 1), ("batch", 0),
                                             ("running", 0), ("batch", 2)])
def test_the_lean_norms_backward_is_one_kernel_and_its_codes_lookup(statistics, bits):
    """NOTE [Native normalisation kernels]: backward is native_batch_norm_backward fed the saved
    x_hat, whatever the statistics; a 1-bit code costs a cast and one table lookup more."""
    norm = RunningStatNorm2d(8, statistics=statistics, xhat_bits=bits).train()
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    grad = torch.randn(16, 8, 6, 6)
    norm(x).backward(grad)    # the code tables are built once, at first use
    x.grad = norm.weight.grad = norm.bias.grad = None
    out = norm(x)
    with OpCounter() as backward:
        out.backward(grad)
    assert backward.by_name["native_batch_norm_backward"] == 1
    lookups = {0: 0, 1: 1, 2: 2}[bits]
    assert backward.by_name["embedding"] == lookups
    assert backward.kernels <= 2 + 3 * lookups, backward.by_name


class _Sequence(OpCounter):
    """The operators in the order they ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


HOST_READS = ("_local_scalar_dense", "item", "is_nonzero", "equal")


def test_the_daemons_step_reads_nothing_on_the_host_until_its_backward_is_queued(
        resnet20_weights):
    """NOTE [One read a step]: a GPU's queue must not drain between the forwards and backward.
    Reads after it (the loss, the finiteness check, Adam's step counts) end the step anyway."""
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    method = Surgeon(model, SurgeonArgs())
    x = torch.rand(16, 3, 32, 32)
    method.step(x)          # the first step probes and learns the layers
    with _Sequence() as ops:
        method.step(x)
    backward = [i for i, name in enumerate(ops.names) if name.endswith("_backward")]
    reads = [i for i, name in enumerate(ops.names) if name in HOST_READS]
    assert backward and reads, (len(backward), len(reads))
    assert min(reads) > max(backward), [ops.names[i] for i in reads if i < max(backward)]
