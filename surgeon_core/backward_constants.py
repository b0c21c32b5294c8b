"""The per-channel constants a lean norm's backward kernel is fed, computed for every norm at once.

NOTE [Deferred backward constants]
A lean norm's backward is one ``native_batch_norm_backward`` (NOTE [Native normalisation
kernels] in norm.py) fed a weight ``gamma * invstd`` and, for a coded x_hat under running
statistics, the mean and variance that map the batch-standardised codes onto the running
standardisation (NOTE [Quantised x_hat]):

    scale = gamma * c,   mean = (mu - m) * c,   var = (sigma^2 + eps) * c * c

where (m, c) are the batch's mean and inverse deviation and (mu, sigma^2) the statistics the
forward normalised with. Per norm that is up to six operators on vectors of a few dozen
channels, in every forward: ResNet-20 in the daemon's recipe launched about 140 of them a step
(issue 15). Nothing reads them before backward, so each norm's forward leaves its inputs here
and the model's statistics queue (NOTE [Batched statistics updates]) computes them for every
norm together when the forward ends: at most nine multi-tensor operators. A backward that
runs before that (a norm outside any model) computes its own, and a forward without autograd
(serving) computes none: it computed three operators a norm before, for nothing.
"""

from typing import List, Optional, Sequence

import torch

__all__ = ["BackwardConstants", "compute_all"]


class BackwardConstants:
    """One norm's (scale, mean, var) for its backward kernel; ``mean``/``var`` None where the
    kernel reads x_hat as it is (zeros and ones)."""

    __slots__ = ("_inputs", "_values")

    def __init__(self, weight: torch.Tensor, invstd: Optional[torch.Tensor],
                 mean: Optional[torch.Tensor] = None, var: Optional[torch.Tensor] = None,
                 eps: float = 0.0, code_mean: Optional[torch.Tensor] = None):
        """``invstd`` None: it is ``rsqrt(var + eps)``. ``code_mean`` given (with ``invstd``
        the codes' inverse deviation): the kernel's mean and variance map the codes."""
        self._inputs = (weight, invstd, mean, var, eps, code_mean)
        self._values: Optional[tuple] = None

    @property
    def pending(self) -> bool:
        return self._values is None

    def values(self):
        if self._values is None:
            compute_all([self])
        return self._values


def compute_all(constants: Sequence[BackwardConstants]) -> None:
    """Fill every pending one of ``constants`` in a few multi-tensor operators."""
    todo = [c for c in constants if c.pending]
    if not todo:
        return
    with torch.no_grad():
        invstds = _invstds([c._inputs for c in todo])
        scales = torch._foreach_mul([c._inputs[0] for c in todo], invstds)
        coded = [i for i, c in enumerate(todo) if c._inputs[5] is not None]
        mapped = _mapped([todo[i]._inputs for i in coded], [invstds[i] for i in coded])
        kernel = dict(zip(coded, zip(*mapped))) if coded else {}
        for i, c in enumerate(todo):
            c._values = (scales[i],) + kernel.get(i, (None, None))
            c._inputs = None


def _invstds(inputs: List[tuple]) -> List[torch.Tensor]:
    """Each one's inverse deviation: given, or rsqrt(var + eps) for all that lack it at once."""
    missing = [i for i, (_, invstd, *_rest) in enumerate(inputs) if invstd is None]
    found = [invstd for _, invstd, *_rest in inputs]
    if missing:
        computed = torch._foreach_add([inputs[i][3] for i in missing],
                                      [float(inputs[i][4]) for i in missing])
        _foreach_rsqrt_(computed)
        for i, value in zip(missing, computed):
            found[i] = value
    return found


def _foreach_rsqrt_(tensors: List[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_rsqrt_"):
        torch._foreach_rsqrt_(tensors)
    else:   # torch 2.0 (JetPack 5) has no multi-tensor rsqrt
        torch._foreach_sqrt_(tensors)
        torch._foreach_reciprocal_(tensors)


def _mapped(inputs: List[tuple], invstds: List[torch.Tensor]):
    """(mu - m) * c and (sigma^2 + eps) * c * c for coded norms."""
    if not inputs:
        return [], []
    means = torch._foreach_sub([i[2] for i in inputs], [i[5] for i in inputs])
    torch._foreach_mul_(means, invstds)
    variances = torch._foreach_add([i[3] for i in inputs], [float(i[4]) for i in inputs])
    torch._foreach_mul_(variances, invstds)
    torch._foreach_mul_(variances, invstds)
    return means, variances
