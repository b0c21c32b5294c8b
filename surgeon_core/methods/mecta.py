"""mecta: tent's objective with MECTA's memory levers (MECTA-norm, layer stop, channel pruning).

Paper: Hong et al., MECTA: Memory-Economic Continual Test-Time Model Adaptation, ICLR 2023.
Upstream: SonyResearch/MECTA (models/batch_norm.py). CIFAR sweep settings: SGD lr 0.0025,
momentum 0.9, batch 16, forget gate with the symmetric KL, beta_thre 0.00125, prune_q 0.7.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from ..norm import forget_gate_rate
from .base import Method, StepResult, entropy
from .registry import register


@dataclass(frozen=True)
class MECTAArgs:
    lr: float = 0.0025
    momentum: float = 0.9
    beta_threshold: float = 0.00125
    prune_q: float = 0.7
    gate_scale: float = 1.0


class _MectaBN(torch.autograd.Function):
    """Forward with updated running statistics; backward as batch-statistics BN on kept channels.

    Only the kept channels' input is saved (a fraction 1 - q). Dropped channels get gamma-gradient
    0, beta-gradient sum(g) and the closed-form input gradient gamma / sigma_r * (g - mean(g)).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, run_mean, run_var, eps, kept):
        shape = (1, -1, 1, 1)
        invstd = torch.rsqrt(run_var + eps)
        ctx.save_for_backward(x[:, kept], weight, run_mean, run_var, kept)
        ctx.eps = eps
        return (x - run_mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x_kept, weight, run_mean, run_var, kept = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        invstd = torch.rsqrt(run_var + ctx.eps)
        grad_x = (grad - grad.mean((0, 2, 3), keepdim=True)) * (weight * invstd).view(shape)
        grad_w = torch.zeros_like(weight)
        grad_b = grad.sum((0, 2, 3))
        with torch.enable_grad():
            xk = x_kept.detach().requires_grad_(True)
            wk = weight[kept].detach().requires_grad_(True)
            var_b, mean_b = torch.var_mean(xk, dim=(0, 2, 3), correction=0)
            # MECTA's re-parameterisation: train-mode BN whose affine matches the running stats
            scale = (wk * torch.sqrt(var_b.detach() + ctx.eps) * invstd[kept])
            out = nn.functional.batch_norm(xk, None, None, scale, None, True, 0.0, ctx.eps)
            gx, gw = torch.autograd.grad(out, (xk, wk), grad[:, kept])
        grad_x[:, kept] = gx
        grad_w[kept] = gw
        return grad_x, grad_w, grad_b, None, None, None, None


class MectaNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with MECTA's forget gate, layer stop criterion and channel-pruned cache."""

    def __init__(self, bn: nn.BatchNorm2d, args: MECTAArgs):
        super().__init__(bn.num_features, bn.eps)
        self.load_state_dict(bn.state_dict(), strict=False)
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            rate = forget_gate_rate(mean_b, var_b, self.running_mean, self.running_var,
                                    self.args.gate_scale).clamp(0.0, 1.0)
            self.running_mean.lerp_(mean_b, rate)
            self.running_var.lerp_(var_b, rate)
        trained = bool(rate > self.args.beta_threshold)  # layer stop: matched layers cache nothing
        self.weight.requires_grad_(trained)
        self.bias.requires_grad_(trained)
        if not trained or not torch.is_grad_enabled():
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
        keep = max(1, int(round((1 - self.args.prune_q) * self.num_features)))
        kept = torch.randperm(self.num_features, device=x.device)[:keep].sort().values
        return _MectaBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self.eps, kept)


def configure_model(model: nn.Module, args: MECTAArgs) -> nn.Module:
    model.train().requires_grad_(False)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, MectaNorm2d(child, args).to(child.weight.device))
        else:
            configure_model(child, args)
    return model


def collect_params(model: nn.Module) -> Tuple[List[nn.Parameter], List[str]]:
    params, names = [], []
    for mod_name, m in model.named_modules():
        if isinstance(m, MectaNorm2d):
            params += [m.weight, m.bias]
            names += [mod_name + ".weight", mod_name + ".bias"]
    return params, names


@register("mecta")
class MECTA(Method):
    """Entropy minimisation on MECTA-norm affine parameters with a channel-pruned cache."""

    def __init__(self, model: nn.Module, args: MECTAArgs = MECTAArgs()):
        configure_model(model, args)
        params, _ = collect_params(model)
        if not params:
            raise ValueError("mecta replaces BatchNorm2d layers and this model has none; use "
                             "surgeon or tent (they adapt LayerNorm and GroupNorm)")
        super().__init__(model, torch.optim.SGD(params, lr=args.lr, momentum=args.momentum))
        self.args = args

    def _loss(self, x: torch.Tensor):
        logits = self.model(x)
        return logits, entropy(logits).mean()

    def _adapt(self, x: torch.Tensor) -> StepResult:
        (logits, loss), cache, paper = self.metered_forward(self._loss, x)
        updated = False
        if loss.requires_grad:  # every layer may have stopped: then there is nothing to train
            loss.backward()
            updated = self.apply_update()
        return StepResult(logits.detach(), float(loss.detach()), cache, paper, updated=updated)
