"""rdumb: another method, reset to the source weights every ``every`` steps.

Paper: Press et al., RDumb: A simple approach that questions our progress in continual test-time
adaptation, NeurIPS 2023. On long streams every method they tested ended below the frozen model,
and resetting one (ETA) every 1,000 steps beat them all. Here it wraps any registered method (the
daemon's surgeon by default), so a long stream shows what periodic forgetting alone buys.
"""

from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import nn

from .base import Method, StepResult
from .registry import get_method, register


@dataclass(frozen=True)
class RDumbArgs:
    method: str = "surgeon"     # the method being reset (with its default arguments)
    every: int = 1000           # steps between resets

    def __post_init__(self):
        if self.every < 1:
            raise ValueError("every must be >= 1, got %r" % (self.every,))
        if self.method == "rdumb":
            raise ValueError("rdumb cannot wrap itself")


@register("rdumb")
class RDumb(Method):
    """Delegates every step to the wrapped method and resets it every ``every`` steps."""

    def __init__(self, model: nn.Module, args: RDumbArgs = RDumbArgs()):
        from . import args_for   # the registry's defaults, imported late (a cycle otherwise)

        self.inner = get_method(args.method)(model, args_for(args.method))
        self.model, self.optimizer = self.inner.model, self.inner.optimizer
        self._source, self._meter = self.inner._source, None
        self.args, self.steps, self.resets = args, 0, 0
        if getattr(self.inner, "engine", None) is not None:
            self.engine = self.inner.engine

    def step(self, x: torch.Tensor) -> StepResult:
        if self.steps and self.steps % self.args.every == 0:
            self.inner.reset()
            self.resets += 1
        self.steps += 1
        return self.inner.step(x)

    def reset(self) -> None:
        self.inner.reset()
        self.steps = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.inner.state_dict(), rdumb_steps=torch.tensor(self.steps))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        self.steps = int(state.pop("rdumb_steps", 0))
        self.inner.load_state_dict(state)
