"""cotta: mean-teacher with augmentation-averaged pseudo-labels and stochastic restore.

Paper: Wang et al., Continual Test-Time Domain Adaptation, CVPR 2022.
Upstream: qinenergy/cotta (cifar/cotta.py). CIFAR-10: Adam 1e-3, EMA 0.999, restore p 0.01,
32 augmentations when the anchor's mean confidence is under 0.92; the teacher's output is scored.
"""

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from .augment import cotta_augment
from .base import Method, StepResult, use_batch_statistics
from .registry import register


@dataclass(frozen=True)
class CoTTAArgs:
    lr: float = 1e-3
    ema: float = 0.999
    restore_p: float = 0.01
    anchor_threshold: float = 0.92
    augmentations: int = 32
    seed: int = 0


@register("cotta")
class CoTTA(Method):
    """Student trained on the teacher's soft labels; teacher is the student's EMA."""

    def __init__(self, model: nn.Module, args: CoTTAArgs = CoTTAArgs()):
        model.train().requires_grad_(True)
        use_batch_statistics(model)
        super().__init__(model, torch.optim.Adam(model.parameters(), lr=args.lr, foreach=True))
        self.args = args
        self.teacher = self._frozen_copy(model)
        self.anchor = self._frozen_copy(model)
        self._rng = random.Random(args.seed)

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        clone = copy.deepcopy(model)
        for p in clone.parameters():
            p.detach_()
        return clone.requires_grad_(False)

    def reset(self) -> None:
        super().reset()
        self.teacher.load_state_dict(self._source["model"])

    def state_dict(self):
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        confidence = self.anchor(x).softmax(1).max(1).values.mean()
        if float(confidence) >= self.args.anchor_threshold:
            return self.teacher(x)
        outs = [self.teacher(cotta_augment(x, self._rng)) for _ in range(self.args.augmentations)]
        return torch.stack(outs).mean(0)

    def _loss(self, x: torch.Tensor, teacher: torch.Tensor):
        student = self.model(x)
        return -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()

    def _adapt(self, x: torch.Tensor) -> StepResult:
        teacher = self._teacher_logits(x)
        loss, cache, paper = self.metered_forward(self._loss, x, teacher)
        loss.backward()
        updated = self.apply_update()
        if updated:
            self._update_teacher()
            self._restore()
        return StepResult(teacher, float(loss.detach()), cache, paper, updated=updated)

    @torch.no_grad()
    def _update_teacher(self) -> None:
        a = self.args.ema
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(a).add_(s, alpha=1 - a)

    @torch.no_grad()
    def _restore(self) -> None:
        source = self._source["model"]
        for name, p in self.model.named_parameters():
            mask = torch.rand_like(p) < self.args.restore_p
            p.copy_(torch.where(mask, source[name].to(p.device), p))
