"""tent: minimise prediction entropy by updating the normalisation layers' affine parameters.

BatchNorm normalises with each test batch's statistics (the paper); models without BatchNorm
(ViT, Swin, ConvNeXt: LayerNorm; GroupNorm nets) adapt their norms' affine parameters the same way.

Paper: Wang et al., Tent: Fully Test-Time Adaptation by Entropy Minimization, ICLR 2021.
Upstream: DequanWang/tent (tent.py); CIFAR settings: Adam, lr 1e-3, batch 200, one step per batch.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from .base import Method, StepResult, entropy, norm_modules, use_batch_statistics
from .registry import register


@dataclass(frozen=True)
class TentArgs:
    """Tent's hyper-parameters (CIFAR defaults)."""

    lr: float = 1e-3
    steps: int = 1


def configure_model(model: nn.Module) -> nn.Module:
    """Train mode, batch statistics, only the norms' weight and bias trainable."""
    model.train().requires_grad_(False)
    use_batch_statistics(model)
    for m in norm_modules(model):
        m.requires_grad_(True)
    return model


def collect_params(model: nn.Module) -> Tuple[List[nn.Parameter], List[str]]:
    """The norms' affine parameters and their dotted names (for logs)."""
    params, names = [], []
    norms = {id(m) for m in norm_modules(model)}
    for mod_name, m in model.named_modules():
        if id(m) in norms:
            for p_name, p in m.named_parameters(recurse=False):
                params.append(p)
                names.append("%s.%s" % (mod_name, p_name))
    return params, names


def check_model(model: nn.Module) -> None:
    """Tent needs normalisation layers with affine parameters to adapt."""
    if not norm_modules(model):
        raise ValueError("tent adapts normalisation layers (BatchNorm, LayerNorm, GroupNorm) "
                         "with affine parameters; this model has none")


@register("tent")
class Tent(Method):
    """Entropy minimisation on the norms' affine parameters, plain autograd (cache measured)."""

    def __init__(self, model: nn.Module, args: TentArgs = TentArgs()):
        check_model(model)
        configure_model(model)
        params, _ = collect_params(model)
        super().__init__(model, torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999),
                                                 foreach=True))
        self.args = args

    def _adapt(self, x: torch.Tensor) -> StepResult:
        first = None
        for _ in range(self.args.steps):
            (logits, loss), cache, paper = self.metered_forward(self._loss, x)
            first = logits.detach() if first is None else first  # predict before any update
            loss.backward()
            updated = self.apply_update()
        return StepResult(first, float(loss.detach()), cache, paper, updated=updated)

    def _loss(self, x: torch.Tensor):
        logits = self.model(x)
        return logits, entropy(logits).mean()
