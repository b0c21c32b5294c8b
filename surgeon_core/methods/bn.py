"""bn: normalise with each test batch's statistics (BN adapt / "norm"); no gradients.

Paper: Schneider et al., Improving robustness against common corruptions by covariate shift
adaptation, NeurIPS 2020. Upstream: DequanWang/tent norm.py.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, StepResult, use_batch_statistics
from .registry import register


@dataclass(frozen=True)
class BNArgs:
    """No options: batch statistics replace the source statistics."""


@register("bn")
class BatchNormAdapt(Method):
    """Eval everything, but BatchNorm normalises with the current batch's mean and variance."""

    def __init__(self, model: nn.Module, args: BNArgs = BNArgs()):
        model.eval().requires_grad_(False)
        use_batch_statistics(model)
        super().__init__(model)

    def _adapt(self, x: torch.Tensor) -> StepResult:
        with torch.no_grad():
            return StepResult(self.model(x))
