"""How many ATen operators a step dispatches: on a GPU each is at least one kernel launch,
and a Jetson's slow cores launch slowly, so the count predicts a launch-bound step.

``OpCounter`` is a TorchDispatchMode (torch 2.0 has it), so it sees every operator below
autograd, forward and backward alike, on any device; the CPU count is the CUDA count, which
lets CI hold the line without a GPU. Where the code takes a CPU-only path (the lean norms'
batch statistics, NOTE [Statistics on the CPU] in norm.py; pruned tensors' exact-count form,
NOTE [Sync-free packing] in sparsity.py), it takes the GPU's path while a counter runs
(``gpu_path``), so the count stays the GPU's. Counting slows the step;
time it without.
"""

import collections
from typing import Counter, Dict

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_READS", "OpCounter", "VIEWS", "gpu_path"]

# operators that run no kernel: metadata only (autograd's AccumulateGrad detaches, for one)
VIEWS = frozenset(("detach", "view", "_unsafe_view", "alias", "as_strided", "expand", "t",
                   "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "split",
                   "split_with_sizes", "unbind", "narrow", "_reshape_alias", "view_as_real",
                   "lift_fresh",
                   # allocations: memory, but no kernel
                   "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"))


# operators that make the host wait for the device: a value read (``item``, ``float(t)``,
# ``bool(t)``) or an output whose size depends on the values; none may run in a step a CUDA
# graph captures (NOTE [Captured step] in capturable.py)
HOST_READS = frozenset(("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                        "unique_consecutive", "repeat_interleave", "equal", "is_nonzero"))

_counting = [0]   # counters active: a process-wide switch, for measurements only


def gpu_path() -> bool:
    """Whether code with a CPU-only fast path should take the GPU's path: a counter runs."""
    return _counting[0] > 0


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: step()``; then ``ops.total`` and ``ops.by_name``.

    ``gpu_paths=False`` counts the paths the code takes on this device (a CPU's own fast paths),
    as a counter of one's own would.
    """

    def __init__(self, gpu_paths: bool = True):
        super().__init__()
        self.by_name: Counter[str] = collections.Counter()
        self.gpu_paths = gpu_paths

    def __enter__(self):
        _counting[0] += int(self.gpu_paths)
        return super().__enter__()

    def __exit__(self, *exc):
        _counting[0] -= int(self.gpu_paths)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def kernels(self) -> int:
        """Operators that run a kernel (views and detaches left out)."""
        return sum(n for name, n in self.by_name.items() if name not in VIEWS)

    @property
    def host_reads(self) -> Dict[str, int]:
        """Operators that made the host wait for the device (``HOST_READS``), by name."""
        return {name: n for name, n in self.by_name.items() if name in HOST_READS}

    def most_common(self, count: int = 8) -> Dict[str, int]:
        return dict(self.by_name.most_common(count))
