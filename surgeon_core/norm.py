"""Running-statistics BatchNorm: the normalisation that makes a lean activation cache possible.

NOTE [Lean normalisation]
Train-mode BatchNorm differentiates through the batch's own statistics, so its input gradient
depends on the whole input: autograd must keep the input dense and exact, which alone caps any
saving near 1/2 of full backprop. ``RunningStatNorm2d`` normalises with statistics (mu, var) that
it treats as constants in backward: the current batch's (default; the forward equals train-mode
BatchNorm) or running statistics updated from the batch by MECTA's forget gate:

    y = gamma * x_hat + beta,   x_hat = (x - mu) / sqrt(var + eps)
    dL/dx = dL/dy * gamma / sqrt(var + eps)        (needs no activation at all)
    dL/dgamma = sum(dL/dy * x_hat)                 (needs x_hat: prunable)
    dL/dbeta = sum(dL/dy)

So the only activation it saves, ``x_hat``, serves a weight gradient and is pruned like a conv
input. Ignoring the paths through batch statistics is not harmless: entropy minimisation then
drifts (measured: ResNet-20 collapsed to 44 % mean error over the continual stream). With batch
statistics the input gradient therefore gets train-mode BatchNorm's own correction,

    dL/dx = gamma / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat)),

whose two per-channel means are dL/dbeta / n and dL/dgamma / n. Only the last term reads x_hat, and
it reads the pruned copy: exact at keep 1, and magnitude pruning drops only the small |x_hat| whose
term is small. A layer that caches nothing still gets the mean correction.

NOTE [Quantised x_hat]
With batch statistics, x_hat is standardised per channel, so a fixed quantiser for a unit Gaussian
fits every layer with no scale to store. ``xhat_bits=1`` keeps its sign (+-0.7979 = E|z|: 1/32 of
fp32), ``2`` adds a magnitude bit (Lloyd-Max levels 0.4528 and 1.5104: 1/16), ``0`` keeps x_hat
itself for the capture policy to prune at the layer's keep ratio (the paper's dynamic sparsity).
Quantised, every layer keeps both its gamma gradient and the input-gradient correction: none is
frozen by a near-zero keep ratio. Measured on continual CIFAR-10-C (BENCHMARKS.md), ResNet-20 at
batch 200: the sign alone gives lower error at less measured cache than pruning x_hat, because a
pruned layer at keep ~0 loses its gamma update and the x_hat term of its input gradient.
The codes are saved as uint8, which the capture layer stores as they are and counts.
Under running statistics x_hat is not standardised, so the codes are taken of the batch-
standardised input and mapped back through a per-channel affine: the same bits, no new scale.

NOTE [Split statistics]
A camera's frames are correlated: one object, so one class, fills many frames in a row, and the
batch statistics of a class-pure batch erase the very features that tell classes apart (issue
14, ResNet-20 on CIFAR-10-C sorted by class: bn 60.1 % error, surgeon 59.4 %, the frozen model
49.2 %). Running statistics resist it but lag a change of domain (34.1 % against 29.2 % on the
shuffled stream). The two kinds of shift show at different depths (measured with the source
model, symmetric KL between a batch's per-channel statistics and the domain's):

    batch of the same domain    shuffled      sorted by class     a batch of the next domain
    first third of the norms    0.000-0.007   0.003-0.015         0.01-2.8 (most > 0.04)
    last third                  0.001-0.003   0.007-0.031         0.04-0.96

Shallow features describe the image (noise, blur, contrast), deep ones the object. So the
shallow norms normalise with each batch's statistics, which follow a new domain at once and
barely depend on the classes, and they measure the shift: ``p = 1 - exp(-scale * KL)`` read as
the chance that the domain changed. The deep norms normalise with running statistics that
average the current domain, ``rate = 1 / n`` with ``n = (1 - p) * n + 1``: a domain change
restarts the average, and within a domain class runs average out instead of taking over.
Measured (BENCHMARKS.md, issue 14): sorted by class 37.2 %, Dirichlet 0.1 29.9 %, shuffled
29.5 % (batch statistics: 59.4, 31.1, 29.2).

In surgeon's recipe the consistency loss's augmented view runs through the same norms, and it
reads as a shift: measured on ResNet-20 at batch 200, each step's view moves p by about 0.17,
so within a domain n settles near 8 forwards (4 steps), not the domain's length. Keeping the
view out of the statistics and the gate (n then grows to the cap) measured worse on the first
1,000 images of each corruption: shuffled 31.2 % against 29.9, sorted by class 37.6 against
37.3 (defocus after impulse noise: 25.5 against 18.9). A short memory that a new domain
overwrites fast is what works; the augmented views keep it short.
"""

import contextlib
import functools
from typing import List, Optional

import torch
from torch import nn

from .sparsity import dequantize_standard, quantize_standard

__all__ = ["RunningStatNorm2d", "ShiftGate", "convert_batchnorm", "forget_gate_rate",
           "shift_gates", "split_statistics", "symmetric_kl"]


def symmetric_kl(batch_mean: torch.Tensor, batch_var: torch.Tensor, run_mean: torch.Tensor,
                 run_var: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean over channels of the symmetric KL between per-channel Gaussians (a 0-dim tensor).

    Not finite exactly when a batch statistic is not (the running ones are kept finite)."""
    batch_var, run_var = batch_var + eps, run_var + eps
    delta2 = (batch_mean - run_mean).square()
    twice = torch.addcdiv((batch_var + delta2) / run_var, run_var + delta2, batch_var)
    return twice.mean() * 0.5 - 1.0


def forget_gate_rate(batch_mean: torch.Tensor, batch_var: torch.Tensor, run_mean: torch.Tensor,
                     run_var: torch.Tensor, scale: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """MECTA's update rate: 1 - exp(-scale * mean symmetric Gaussian KL(batch, running)).

    Returned as a 0-dim tensor on the statistics' device: reading it would stall a GPU.
    """
    return -torch.expm1(-scale * symmetric_kl(batch_mean, batch_var, run_mean, run_var, eps))


class ShiftGate:
    """The domain-shift gate shared by one model's norms (NOTE [Split statistics]).

    The shallow norms ``report`` how far each batch's statistics are from their running ones,
    ``p = 1 - exp(-scale * mean KL)``, read as the chance that the domain changed. The gate
    keeps an effective count of batches seen since the last change, ``n = (1 - p) * n + 1``
    (at most ``max_count``), and the deep norms, which run later in the same forward, move
    their running statistics at ``1 / n``: a running average over the current domain, which
    class-correlated batches bias less the longer the domain lasts. Tensors stay on the
    device: no host sync. With ``lag`` the deep norms normalise each batch with the statistics
    from before it: a class-pure batch is not standardised by its own class.
    """

    def __init__(self, scale: float = 3.0, max_count: float = 100.0, lag: bool = False):
        self.scale, self.lag = scale, lag
        self.max_count = max_count
        self._reports = []
        self._rate: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def state(self):
        return self.count, self._rate, list(self._reports)

    def load_state(self, state) -> None:
        self.count, self._rate, self._reports = state[0], state[1], list(state[2])

    def restart(self) -> None:
        """Back to the source statistics' full count (after a reset to the source)."""
        self.clear()
        self.count = None

    def clear(self) -> None:
        """A new forward: forget the previous one's reports."""
        self._reports, self._rate = [], None

    def report(self, skl: torch.Tensor) -> None:
        self._reports.append(skl)

    def rate(self) -> Optional[torch.Tensor]:
        """This forward's update rate for the deep norms; None before any shallow report."""
        if self._rate is None and self._reports:
            skl = torch.nan_to_num(torch.stack(self._reports).mean(), nan=0.0, posinf=1e4)
            changed = -torch.expm1(-self.scale * skl)
            # the source statistics start as a full count: a first batch does not replace them
            count = torch.full_like(changed, self.max_count) if self.count is None else self.count
            self.count = ((1.0 - changed) * count + 1.0).clamp(max=self.max_count)
            self._rate = 1.0 / self.count
        return self._rate


def _no_torch_function():
    """A context in which no __torch_function__ mode or override runs (torch >= 2.0)."""
    disable = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _finite(value: torch.Tensor) -> torch.Tensor:
    """Whether a 0-dim tensor is finite, on the device: value - value is 0 unless it is NaN or
    infinite (two operators; isfinite is four on the CPU)."""
    return (value - value) == 0


@functools.lru_cache(maxsize=64)
def _standard(channels: int, device: torch.device, dtype: torch.dtype):
    """Per-channel zeros and ones: statistics under which a tensor is its own x_hat."""
    return (torch.zeros(channels, device=device, dtype=dtype),
            torch.ones(channels, device=device, dtype=dtype))


class _LeanAffine(torch.autograd.Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias without differentiating mean and var.

    With ``center`` (batch statistics) the input gradient gets train-mode BatchNorm's correction,
    dx = w * invstd * (g - mean(g) - x_hat * mean(g * x_hat)), from the saved (pruned or coded)
    x_hat; see NOTE [Lean normalisation]. ``code_mean``/``code_var``: under running statistics,
    the batch statistics x_hat is coded against (NOTE [Quantised x_hat]).

    NOTE [Native normalisation kernels]
    The forward is one ``batch_norm`` kernel in inference form (the statistics are given), and
    the backward one ``native_batch_norm_backward`` fed the saved x_hat as if it were the input:
    with mean 0 and invstd 1 it reads x_hat as it is, and weight * invstd as its weight makes its
    input gradient ours. In training form that kernel applies the centring correction; in
    inference form (running statistics) it does not, and there a coded x_hat is mapped onto
    the running standardisation through the kernel's own mean and variance. One kernel each way
    instead of about twenty elementwise ones (issue 15: a GPU step is launch-bound), and none of
    the full-size temporaries of the elementwise form.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, center, bits, code_mean=None,
                code_var=None):
        ctx.center, ctx.codes = center, None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        var_eps = var + eps
        invstd = torch.rsqrt(var_eps)
        scale = weight * invstd
        # quantised x_hat is cheap enough to keep the correction even where gamma is frozen
        wanted = ctx.needs_input_grad[1] or (bits > 0 and center and ctx.needs_input_grad[0])
        if not wanted:  # nothing to cache
            ctx.save_for_backward(None, None, scale, None, None)
            return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        run_mean = run_var = None     # the kernel's statistics: x_hat as it is by default
        if bits == 0:
            x_hat = nn.functional.batch_norm(x, mean, var, None, None, False, 0.0, eps)
            ctx.save_for_backward(x_hat, None, scale, None, None)
            return torch.addcmul(bias.view(shape), x_hat, weight.view(shape))
        coded_invstd = invstd
        if code_mean is not None:   # running statistics: x coded against the batch's
            code_var_eps = code_var + eps
            coded_invstd = torch.rsqrt(code_var_eps)
            run_mean = (mean - code_mean) * coded_invstd
            run_var = var_eps / code_var_eps
            scale = weight * coded_invstd
            center_at = code_mean
        else:
            center_at = mean
        ctx.codes = (x.shape, x.numel(), x.dtype)
        ctx.save_for_backward(*quantize_standard(x, bits, center_at.view(shape),
                                                 coded_invstd.view(shape)),
                              scale, run_mean, run_var)
        return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        x_hat, big, scale, run_mean, run_var = ctx.saved_tensors
        if ctx.codes is not None:
            shape, numel, dtype = ctx.codes
            x_hat = dequantize_standard(x_hat, big, numel, dtype).view(shape)
        wanted = ctx.needs_input_grad[:3]
        if x_hat is None:
            return _grads_without_x_hat(ctx, grad, scale) + (None,) * 7
        zeros, ones = _standard(scale.numel(), scale.device, scale.dtype)
        if ctx.center:
            grads = torch.ops.aten.native_batch_norm_backward(
                grad, x_hat, scale, None, None, zeros, ones, True, 0.0, list(wanted))
        else:
            grads = torch.ops.aten.native_batch_norm_backward(
                grad, x_hat, scale, zeros if run_mean is None else run_mean,
                ones if run_var is None else run_var, None, None, False, 0.0, list(wanted))
        return tuple(g if w else None for g, w in zip(grads, wanted)) + (None,) * 7


def _grads_without_x_hat(ctx, grad: torch.Tensor, scale: torch.Tensor):
    """Input and bias gradients of a norm that cached nothing (its weight is frozen)."""
    dims = [0] + list(range(2, grad.dim()))
    grad_b = grad.sum(dims) if ctx.needs_input_grad[2] else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        g = grad - grad.mean(dims, keepdim=True) if ctx.center else grad
        grad_x = g * scale.view(shape)
    return grad_x, None, grad_b


STATISTICS = ("batch", "running")
XHAT_BITS = (0, 1, 2)


class RunningStatNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics are constants in backward (see NOTE [Lean normalisation]).

    In training it normalises with the current batch's statistics (``statistics="batch"``, the
    default: the same output as train-mode BatchNorm) or with the running statistics just updated
    from the batch (``"running"``: MECTA's norm, steadier on small batches). Either way the
    running statistics are updated (forget gate or fixed momentum) for eval-mode use.

    Args:
        num_features: channels.
        gate_scale: forget-gate scale ``s``; ``None`` uses a fixed ``momentum`` instead.
        momentum: fixed update rate when the gate is off.
        statistics: ``batch`` or ``running``.
        xhat_bits: 0 (x_hat kept for the capture policy), 1 or 2 (NOTE [Quantised x_hat]).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 gate_scale: Optional[float] = 1.0, statistics: str = "batch",
                 xhat_bits: int = 0):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if statistics not in STATISTICS:
            raise ValueError("statistics must be one of %s, got %r" % (STATISTICS, statistics))
        if xhat_bits not in XHAT_BITS:
            raise ValueError("xhat_bits must be one of %s, got %r" % (XHAT_BITS, xhat_bits))
        self.gate_scale = gate_scale
        self.statistics = statistics
        self.xhat_bits = xhat_bits
        self._last_rate = (torch.zeros(()), torch.ones((), dtype=torch.bool))   # (rate, finite)
        self.join_gate(None)

    @property
    def last_rate(self) -> float:
        """The update rate of the latest batch (0 when it was not finite; decided here, when
        asked, not in every forward)."""
        rate, finite = self._last_rate
        return float(rate) if bool(finite) else 0.0

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, gate_scale: Optional[float] = 1.0,
                       statistics: str = "batch", xhat_bits: int = 0):
        """A copy of ``bn`` (weights and running statistics) with lean normalisation."""
        new = cls(bn.num_features, bn.eps, bn.momentum or 0.1, gate_scale, statistics, xhat_bits)
        new.load_state_dict(bn.state_dict(), strict=False)
        return new.to(bn.weight.device)

    def join_gate(self, gate: Optional[ShiftGate], role: str = "", first: bool = False) -> None:
        """Take part in a model's ShiftGate: ``shallow`` norms report to it (``first`` clears it
        at each forward), ``deep`` norms update their running statistics at its rate."""
        self.shift_gate, self.gate_role, self._clears_gate = gate, role, first

    def _rate(self, mean, var):
        """This batch's update rate for the running statistics (see ``join_gate``), and
        whether the batch's statistics are finite (a 0-dim bool tensor: no host sync)."""
        gate, role = self.shift_gate, self.gate_role
        if gate is not None and role == "deep":
            shared = gate.rate()
            if shared is not None:
                return shared, _finite((mean + var).sum())
        skl = None
        if self.gate_scale is not None or (gate is not None and role == "shallow"):
            skl = symmetric_kl(mean, var, self.running_mean, self.running_var)   # once a step
        if gate is not None and role == "shallow":
            if self._clears_gate:
                gate.clear()
            gate.report(skl)
        finite = _finite((mean + var).sum() if skl is None else skl)
        if self.gate_scale is None:
            return torch.full((), self.momentum, device=mean.device), finite
        # forget_gate_rate, from the KL above; a NaN rate would survive the lerp with itself
        return torch.nan_to_num(-torch.expm1(-self.gate_scale * skl), nan=0.0), finite

    @torch.no_grad()
    def _update_statistics(self, x: torch.Tensor):
        """Update the running statistics from ``x``; return the batch's (mean, var), or the
        running ones where the batch is not finite (it must not poison them)."""
        dims = [0] + list(range(2, x.dim()))
        # E[x^2] - E[x]^2: several times faster than var_mean over these dims on the CPU
        mean = x.mean(dims)
        var = torch.addcmul((x * x).mean(dims), mean, mean, value=-1.0).clamp_(min=0.0)
        rate, finite = self._rate(mean, var)   # finite: a rate any stand-in leaves alone
        mean = torch.where(finite, mean, self.running_mean)
        var = torch.where(finite, var, self.running_var)
        self.running_mean.lerp_(mean, rate)
        self.running_var.lerp_(var, rate)
        self._last_rate = (rate, finite)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the capture layer classifies this module's saves by the module itself, so its twenty
        # small operators need not pass through the op tracker's Python mode one by one
        with _no_torch_function():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, batch = self.running_mean, self.running_var, None
        if self.training and x.numel() > x.shape[1]:
            if self.gate_role == "deep" and self.shift_gate.lag:   # this batch's own excluded
                mean, var = mean.clone(), var.clone()
            batch = self._update_statistics(x)
            if self.statistics == "batch":
                mean, var = batch
        center = self.training and self.statistics == "batch"
        bits = self.xhat_bits if batch is not None else 0
        # x_hat under running statistics is coded against the batch's
        codes = batch if bits and not center else (None, None)
        return _LeanAffine.apply(x, self.weight, self.bias, mean, var, self.eps, center, bits,
                                 *codes)


def shift_gates(model: nn.Module) -> List[ShiftGate]:
    """The distinct shift gates of ``model``'s lean norms."""
    found = {}
    for m in model.modules():
        gate = getattr(m, "shift_gate", None)
        if isinstance(gate, ShiftGate):
            found[id(gate)] = gate
    return list(found.values())


def split_statistics(model: nn.Module, shallow: int, scale: float = 3.0,
                     lag: bool = False) -> ShiftGate:
    """The first ``shallow`` lean norms (module order) normalise with batch statistics and
    report to one ShiftGate; the rest normalise with running statistics updated at its rate
    (NOTE [Split statistics])."""
    norms = [m for m in model.modules() if isinstance(m, RunningStatNorm2d)]
    gate = ShiftGate(scale, lag=lag)
    shallow = max(1, min(shallow, len(norms)))
    for index, m in enumerate(norms):
        is_shallow = index < shallow
        m.statistics = "batch" if is_shallow else "running"
        m.join_gate(gate, "shallow" if is_shallow else "deep", first=index == 0)
    return gate


def convert_batchnorm(model: nn.Module, gate_scale: Optional[float] = 1.0,
                      statistics: str = "batch", xhat_bits: int = 0) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` (in place) by a ``RunningStatNorm2d`` copy."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, RunningStatNorm2d):
            setattr(model, name, RunningStatNorm2d.from_batchnorm(child, gate_scale, statistics,
                                                                  xhat_bits))
        else:
            convert_batchnorm(child, gate_scale, statistics, xhat_bits)
    return model
