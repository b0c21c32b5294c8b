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

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .backward_constants import BackwardConstants
from .opcount import gpu_path
from .sparsity import dequantize_standard, memory_order, quantize_standard, shaped_from_memory
from .statistics_queue import StatisticsQueue, install, no_torch_function, symmetric_kl_terms

__all__ = ["RunningStatNorm2d", "ShiftGate", "convert_batchnorm", "forget_gate_rate",
           "shift_gates", "split_statistics", "symmetric_kl"]


def symmetric_kl(batch_mean: torch.Tensor, batch_var: torch.Tensor, run_mean: torch.Tensor,
                 run_var: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean over channels of the symmetric KL between per-channel Gaussians (a 0-dim tensor).

    Not finite exactly when a batch statistic is not (the running ones are kept finite)."""
    return symmetric_kl_terms(batch_mean, batch_var, run_mean, run_var, eps).mean() * 0.5 - 1.0


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
        """A copy: ``count`` changes in place."""
        count = None if self.count is None else self.count.clone()
        return count, self._rate, list(self._reports)

    def load_state(self, state) -> None:
        count, self._rate, self._reports = state[0], state[1], list(state[2])
        if count is None:
            self._full_count()
        elif self.count is not None and self.count.shape == count.shape:
            self.count.copy_(count)   # the same storage: a captured step reads it there
        else:
            self.count = count.clone()

    def restart(self) -> None:
        """Back to the source statistics' full count (after a reset to the source)."""
        self.clear()
        self._full_count()

    def _full_count(self) -> None:
        """No count yet means the full one; one that exists is filled where it lies."""
        if self.count is not None:
            self.count.fill_(self.max_count)

    def clear(self) -> None:
        """A new forward: forget the previous one's reports."""
        self._reports, self._rate = [], None

    def report(self, skl: torch.Tensor) -> None:
        """Shallow norms' mean KLs (a vector: NOTE [Batched statistics updates])."""
        self._reports.append(skl.reshape(-1))

    def rate_after(self, queue: StatisticsQueue) -> Optional[torch.Tensor]:
        """``rate()``, the shallow norms' waiting updates run first: they report the KLs."""
        if self._rate is None:
            queue.flush()
        return self.rate()

    def rate(self) -> Optional[torch.Tensor]:
        """This forward's update rate for the deep norms; None before any shallow report."""
        if self._rate is None and self._reports:
            reports = self._reports
            skl = reports[0] if len(reports) == 1 else torch.cat(reports)
            skl = torch.nan_to_num(skl.mean(), nan=0.0, posinf=1e4)
            changed = -torch.expm1(-self.scale * skl)
            if self.count is None:   # the source statistics start as a full count: a first
                # batch does not replace them
                self.count = torch.full_like(changed, self.max_count)
            # in place, not rebound: a replayed CUDA graph (NOTE [Captured step]) reads and
            # writes the count where it was captured
            self.count.mul_(1.0 - changed).add_(1.0).clamp_(max=self.max_count)
            self._rate = 1.0 / self.count
        return self._rate


@functools.lru_cache(maxsize=64)
def _standard(channels: int, device: torch.device, dtype: torch.dtype):
    """Per-channel zeros and ones: statistics under which a tensor is its own x_hat."""
    return (torch.zeros(channels, device=device, dtype=dtype),
            torch.ones(channels, device=device, dtype=dtype))


def _channel_shape(x: torch.Tensor):
    return (1, -1) + (1,) * (x.dim() - 2)


def _train_forward(x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float, output: bool = True):
    """(out, mean, invstd) as ``native_batch_norm`` in training form returns them; ``out`` is
    None where not ``output`` and the CPU path runs.

    NOTE [Statistics on the CPU]
    On a GPU the training-form kernel is one launch for the output and the batch's statistics.
    The CPU's is 2.5-4x slower than two reductions and an inference-form ``batch_norm``
    (measured on one thread: 0.54 against 0.22 ms at 16x16x32x32, 7.3 against 5.0 ms at
    200x16x32x32), so there the statistics are E[x] and E[x^2] - E[x]^2: eight operators where
    the GPU launches one. While an ``OpCounter`` runs the CPU takes the GPU's path, so that the
    count is a GPU's (``opcount.gpu_path``); tests hold the two paths equal.
    """
    if x.device.type != "cpu" or gpu_path():
        return torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    var = torch.addcmul((x * x).mean(dims), mean, mean, value=-1.0).clamp_(min=0.0)
    out = nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps) if output \
        else None
    return out, mean, torch.rsqrt(var + eps)


class _LeanBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm on the batch's own statistics, which backward treats as constants
    but for train-mode BatchNorm's centring correction (NOTE [Lean normalisation]): returns
    (y, mean, invstd), the statistics for the running update.

    NOTE [Native normalisation kernels]
    On a GPU the forward is one ``native_batch_norm`` in training form: the output and the
    batch's statistics in one pass (with ``xhat_bits=0`` it runs without the affine, and x_hat
    is saved; the CPU's path: NOTE [Statistics on the CPU]). The backward is one
    ``native_batch_norm_backward`` fed the saved x_hat as if it were the input: with mean 0 and
    invstd 1 it reads x_hat as it is, and weight * invstd as its weight makes its input gradient
    ours; in training form the kernel applies the centring correction. One kernel each way
    instead of about twenty elementwise ones (issue 15: a GPU step is launch-bound), and none of
    the elementwise form's full-size temporaries.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, bits, queue=None):
        ctx.center, ctx.codes = True, None
        ctx.set_materialize_grads(False)   # no zeros for the statistics' gradients
        shape = _channel_shape(x)
        # quantised x_hat is cheap enough to keep the correction even where gamma is frozen
        wanted = ctx.needs_input_grad[1] or (bits > 0 and ctx.needs_input_grad[0])
        if wanted and bits == 0:
            x_hat, mean, invstd = _train_forward(x, None, None, eps)
            out = torch.addcmul(bias.view(shape), x_hat, weight.view(shape))
            saved = (x_hat, None)
        else:
            out, mean, invstd = _train_forward(x, weight, bias, eps)
            saved = (None, None)
            if wanted:
                ctx.codes = _code_layout(x)
                saved = quantize_standard(x, bits, mean.view(shape), invstd.view(shape),
                                          ctx.codes.order)
        ctx.save_for_backward(*saved)
        ctx.constants = _deferred(queue, BackwardConstants(weight, invstd.detach()))
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        if grad is None:
            return (None,) * 6
        return _lean_backward(ctx, grad) + (None, None, None)


class _LeanAffine(torch.autograd.Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias on given statistics (running ones, or
    a norm in evaluation), constants in backward. ``code_mean``/``code_invstd``: the batch
    statistics a quantised x_hat is coded against (NOTE [Quantised x_hat]); the coded x_hat
    reaches ``native_batch_norm_backward`` (in inference form: no centring) through the
    kernel's own mean and variance, which map it onto the running standardisation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, bits, code_mean=None, code_invstd=None,
                queue=None):
        ctx.center, ctx.codes = False, None
        if not ctx.needs_input_grad[1]:    # nothing to cache
            ctx.save_for_backward(None, None)
            ctx.constants = _deferred(queue, BackwardConstants(weight, None, var=var, eps=eps))
            return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        if bits == 0 or code_mean is None:
            x_hat = nn.functional.batch_norm(x, mean, var, None, None, False, 0.0, eps)
            ctx.save_for_backward(x_hat, None)
            ctx.constants = _deferred(queue, BackwardConstants(weight, None, var=var, eps=eps))
            return torch.addcmul(bias.view(_channel_shape(x)), x_hat,
                                 weight.view(_channel_shape(x)))
        shape = _channel_shape(x)
        ctx.codes = _code_layout(x)
        ctx.save_for_backward(*quantize_standard(x, bits, code_mean.view(shape),
                                                 code_invstd.view(shape), ctx.codes.order))
        # the kernel's statistics: the coded x_hat mapped onto the running standardisation
        ctx.constants = _deferred(queue, BackwardConstants(weight, code_invstd, mean, var, eps,
                                                           code_mean))
        return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        return _lean_backward(ctx, grad) + (None,) * 7


class _CodeLayout(NamedTuple):
    """What dequantising a coded x_hat needs to rebuild it (NOTE [Memory order])."""

    shape: torch.Size
    numel: int
    dtype: torch.dtype
    order: Optional[Tuple[int, ...]]


def _code_layout(x: torch.Tensor) -> _CodeLayout:
    return _CodeLayout(x.shape, x.numel(), x.dtype, memory_order(x))


def _deferred(queue: Optional[StatisticsQueue], constants: BackwardConstants):
    """``constants``, left for ``queue``'s next flush (NOTE [Deferred backward constants])."""
    return queue.defer(constants) if queue is not None else constants


def _lean_backward(ctx, grad):
    """Input, weight and bias gradients of either lean Function from its saved x_hat."""
    x_hat, big = ctx.saved_tensors
    scale, run_mean, run_var = ctx.constants.values()
    if ctx.codes is not None:
        shape, numel, dtype, order = ctx.codes
        x_hat = shaped_from_memory(dequantize_standard(x_hat, big, numel, dtype), shape, order)
    wanted = ctx.needs_input_grad[:3]
    if x_hat is None:
        return _grads_without_x_hat(ctx, grad, scale)
    zeros, ones = _standard(scale.numel(), scale.device, scale.dtype)
    if ctx.center:
        grads = torch.ops.aten.native_batch_norm_backward(
            grad, x_hat, scale, None, None, zeros, ones, True, 0.0, list(wanted))
    else:
        grads = torch.ops.aten.native_batch_norm_backward(
            grad, x_hat, scale, zeros if run_mean is None else run_mean,
            ones if run_var is None else run_var, None, None, False, 0.0, list(wanted))
    return tuple(g if w else None for g, w in zip(grads, wanted))


def _grads_without_x_hat(ctx, grad: torch.Tensor, scale: torch.Tensor):
    """Input and bias gradients of a norm that cached nothing (its weight is frozen)."""
    dims = [0] + list(range(2, grad.dim()))
    grad_b = grad.sum(dims) if ctx.needs_input_grad[2] else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        if ctx.center:   # the centred copy is ours: scaled in place, no second temporary
            grad_x = (grad - grad.mean(dims, keepdim=True)).mul_(scale.view(shape))
        else:
            grad_x = grad * scale.view(shape)
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
        self.statistics_queue: Optional[StatisticsQueue] = None   # the model's, once converted
        self._own_queue = StatisticsQueue()                        # used while there is none
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._flush()   # an update waiting would land on the loaded statistics
        super()._load_from_state_dict(*args, **kwargs)

    def _flush(self) -> None:
        if self.statistics_queue is not None:
            self.statistics_queue.flush()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the capture layer classifies this module's saves by the module itself, so its small
        # operators need not pass through the op tracker's Python mode one by one
        alone = self.statistics_queue is None   # in no model's queue: the update runs at once
        queue = self._own_queue if alone else self.statistics_queue
        with no_torch_function():
            try:
                return self._forward(x, queue)
            finally:
                if alone:
                    queue.flush()

    def _forward(self, x: torch.Tensor, queue: StatisticsQueue) -> torch.Tensor:
        if queue.holds(self):   # run again before the forward ended: its update first
            queue.flush()
        # backward constants wait for the queue only where a backward may run; without one
        # nothing ever asks for them (serving: NOTE [Deferred backward constants])
        later = queue if torch.is_grad_enabled() else None
        if not (self.training and x.numel() > x.shape[1]):
            return _LeanAffine.apply(x, self.weight, self.bias, self.running_mean,
                                     self.running_var, self.eps, 0, None, None, later)
        if self.statistics == "batch":
            if self.shift_gate is not None and self._clears_gate:
                self.shift_gate.clear()
            out, mean, invstd = _LeanBatchNorm.apply(x, self.weight, self.bias, self.eps,
                                                     self.xhat_bits, later)
            queue.add(self, mean, invstd)
            return out
        mean, var, batch_mean, batch_invstd = self._running_statistics(x, queue)
        return _LeanAffine.apply(x, self.weight, self.bias, mean, var, self.eps,
                                 self.xhat_bits, batch_mean, batch_invstd, later)

    @torch.no_grad()
    def _running_statistics(self, x: torch.Tensor, queue: StatisticsQueue):
        """The statistics a running-statistics norm normalises ``x`` with: its running ones
        moved toward the batch's (at the shift gate's rate for a deep norm, else its own), and
        the batch's (mean, invstd) that x_hat is coded against."""
        _, batch_mean, batch_invstd = _train_forward(x, None, None, self.eps, output=False)
        gate = self.shift_gate if self.gate_role == "deep" else None
        rate = gate.rate_after(queue) if gate is not None else None
        queue.add(self, batch_mean, batch_invstd, rate)
        if rate is None:    # its own gate's rate, from its own KL: the update runs now
            queue.flush()
        if rate is None or gate.lag:   # lag: this batch's own statistics excluded
            return self.running_mean, self.running_var, batch_mean, batch_invstd
        # the queue clamps the batch variance it stores; here it only meets var + eps
        batch_var = batch_invstd.pow(-2).sub_(self.eps)
        return (torch.lerp(self.running_mean, batch_mean, rate),
                torch.lerp(self.running_var, batch_var, rate), batch_mean, batch_invstd)


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
    """Replace every ``nn.BatchNorm2d`` in ``model`` (in place) by a ``RunningStatNorm2d`` copy;
    their running-statistics updates run together after each forward of ``model`` (NOTE
    [Batched statistics updates])."""
    _convert(model, gate_scale, statistics, xhat_bits)
    install(model, [m for m in model.modules() if isinstance(m, RunningStatNorm2d)])
    return model


def _convert(model: nn.Module, gate_scale: Optional[float], statistics: str,
             xhat_bits: int) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, RunningStatNorm2d):
            setattr(model, name, RunningStatNorm2d.from_batchnorm(child, gate_scale, statistics,
                                                                  xhat_bits))
        else:
            _convert(child, gate_scale, statistics, xhat_bits)
