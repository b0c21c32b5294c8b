"""A CUDA graph's semantics on the CPU, for tests: record every operator a function dispatches,
then replay them on the very tensors recorded, with no Python in between.

A replay re-runs each recorded operator on the recorded arguments (the same tensor objects,
which now hold new values) and writes its result into the recorded output, as a graph's
kernels write where the capture allocated. Python runs once, at recording: a value the host
computed then is replayed as it was, a tensor the code rebinds instead of updating in place
goes stale, and random operators draw anew. Those are a CUDA graph's rules.
"""

from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Recording(TorchDispatchMode):
    """``with Recording() as graph: outputs = fn()``; then ``graph.replay()`` as often as
    wanted, after writing new inputs into the tensors ``fn`` read."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, out in self.calls:
            new = func(*args, **kwargs)
            for recorded, fresh in zip(_tensors(out), _tensors(new)):
                if recorded is not fresh and recorded.data_ptr() != fresh.data_ptr():
                    recorded.copy_(fresh)


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
