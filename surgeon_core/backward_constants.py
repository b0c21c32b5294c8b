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

from typing import List, NamedTuple, Optional, Sequence

import torch

__all__ = ["BackwardConstants", "compute_all"]


class _Inputs(NamedTuple):
    weight: torch.Tensor
    invstd: Optional[torch.Tensor]      # None: rsqrt(var + eps)
    mean: Optional[torch.Tensor]        # the statistics the forward normalised with
    var: Optional[torch.Tensor]
    eps: float
    code_mean: Optional[torch.Tensor]   # given: the codes' mean (and ``invstd`` their scale)


class BackwardConstants:
    """One norm's (scale, mean, var) for its backward kernel; ``mean``/``var`` None where the
    kernel reads x_hat as it is (zeros and ones)."""

    __slots__ = ("_inputs", "_values")

    def __init__(self, weight: torch.Tensor, invstd: Optional[torch.Tensor],
                 mean: Optional[torch.Tensor] = None, var: Optional[torch.Tensor] = None,
                 eps: float = 0.0, code_mean: Optional[torch.Tensor] = None):
        """``invstd`` None: it is ``rsqrt(var + eps)``. ``code_mean`` given (with ``invstd``
        the codes' inverse deviation): the kernel's mean and variance map the codes."""
        self._inputs: Optional[_Inputs] = _Inputs(weight, invstd, mean, var, float(eps),
                                                  code_mean)
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
    inputs = [c._inputs for c in todo]
    with torch.no_grad():
        invstds = _invstds(inputs)
        scales = torch._foreach_mul([i.weight for i in inputs], invstds)
        coded = [k for k, i in enumerate(inputs) if i.code_mean is not None]
        mapped = dict(zip(coded, _mapped([inputs[k] for k in coded],
                                         [invstds[k] for k in coded])))
        for k, c in enumerate(todo):
            c._values = (scales[k],) + mapped.get(k, (None, None))
            c._inputs = None


def _invstds(inputs: List[_Inputs]) -> List[torch.Tensor]:
    """Each one's inverse deviation: given, or rsqrt(var + eps) for all that lack it at once."""
    found = [i.invstd for i in inputs]
    missing = [k for k, invstd in enumerate(found) if invstd is None]
    if missing:
        computed = torch._foreach_add([inputs[k].var for k in missing],
                                      [inputs[k].eps for k in missing])
        _foreach_rsqrt_(computed)
        for k, value in zip(missing, computed):
            found[k] = value
    return found


def _foreach_rsqrt_(tensors: List[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_rsqrt_"):
        torch._foreach_rsqrt_(tensors)
    else:   # torch 2.0 (JetPack 5) has no multi-tensor rsqrt
        torch._foreach_sqrt_(tensors)
        torch._foreach_reciprocal_(tensors)


def _mapped(inputs: List[_Inputs], invstds: List[torch.Tensor]):
    """Coded norms' ((mu - m) * c, (sigma^2 + eps) * c * c) pairs."""
    if not inputs:
        return []
    means = torch._foreach_sub([i.mean for i in inputs], [i.code_mean for i in inputs])
    torch._foreach_mul_(means, invstds)
    variances = torch._foreach_add([i.var for i in inputs], [i.eps for i in inputs])
    torch._foreach_mul_(variances, invstds)
    torch._foreach_mul_(variances, invstds)
    return list(zip(means, variances))
