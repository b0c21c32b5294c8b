"""source: the unadapted model in eval mode, the reference every method must beat."""

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, StepResult
from .registry import register


@dataclass(frozen=True)
class SourceArgs:
    """No options: the source model is used as trained."""


@register("source")
class Source(Method):
    """Predict with the frozen source model (eval-mode BatchNorm, running statistics)."""

    def __init__(self, model: nn.Module, args: SourceArgs = SourceArgs()):
        super().__init__(model.eval().requires_grad_(False))

    def _adapt(self, x: torch.Tensor) -> StepResult:
        with torch.no_grad():
            return StepResult(self.model(x))
