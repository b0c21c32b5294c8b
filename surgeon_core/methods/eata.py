"""eata: entropy minimisation on reliable, non-redundant samples, reweighted by certainty.

Paper: Niu et al., Efficient Test-Time Model Adaptation without Forgetting, ICML 2022.
Upstream: mr-eggplant/EATA (eata.py). Without the Fisher term (``fisher_alpha=0``, the default:
fully test-time adaptation has no clean source images) this is ETA.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from .base import Method, StepResult, entropy
from .registry import register
from .tent import check_model, collect_params, configure_model


@dataclass(frozen=True)
class EATAArgs:
    """EATA's CIFAR-10 settings (mariodoebler's config): Adam 1e-3, E0 = 0.4 ln C, d = 0.4."""

    lr: float = 1e-3
    margin: float = 0.4
    d_margin: float = 0.4
    fisher_alpha: float = 0.0


def fisher_information(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> Dict:
    """Diagonal Fisher of the trainable parameters from clean images (pseudo-label CE)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        loss = nn.functional.cross_entropy(logits, logits.argmax(1))
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            fisher[n] += g.detach() ** 2
        batches += 1
    return {n: (f / max(1, batches), params[n].detach().clone()) for n, f in fisher.items()}


@register("eata")
class EATA(Method):
    """Tent's parameters and loss, restricted to reliable, non-redundant samples."""

    def __init__(self, model: nn.Module, args: EATAArgs = EATAArgs(),
                 fisher: Optional[Dict] = None):
        check_model(model)
        configure_model(model)
        if args.fisher_alpha > 0 and fisher is None:
            raise ValueError("eata with fisher_alpha > 0 needs Fisher information from clean "
                             "source images (fisher_information); use fisher_alpha=0 for ETA")
        params, _ = collect_params(model)
        super().__init__(model, torch.optim.Adam(params, lr=args.lr, foreach=True))
        self.args, self.fisher = args, fisher
        self.mean_probs: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.mean_probs = None

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        threshold = self.args.margin * math.log(logits.shape[1])
        ent = entropy(logits.detach())
        keep = ent < threshold
        probs = logits.detach().softmax(1)
        if self.mean_probs is not None:
            cos = nn.functional.cosine_similarity(self.mean_probs[None], probs, dim=1)
            keep &= cos.abs() < self.args.d_margin
        if bool(keep.any()):
            batch_mean = probs[keep].mean(0)
            self.mean_probs = batch_mean if self.mean_probs is None else \
                0.9 * self.mean_probs + 0.1 * batch_mean
        return keep

    def _loss(self, x: torch.Tensor):
        logits = self.model(x)
        keep = self._select(logits)
        threshold = self.args.margin * math.log(logits.shape[1])
        ent = entropy(logits)
        weight = torch.exp(-(ent.detach() - threshold)) * keep.float()
        loss = (weight * ent).sum() / keep.sum().clamp(min=1)
        if self.fisher is not None and self.args.fisher_alpha > 0:
            for name, p in self.model.named_parameters():
                if name in self.fisher:
                    f, theta0 = self.fisher[name]
                    loss = loss + self.args.fisher_alpha * (f * (p - theta0) ** 2).sum()
        return logits, loss, int(keep.sum())

    def _adapt(self, x: torch.Tensor) -> StepResult:
        (logits, loss, selected), cache, paper = self.metered_forward(self._loss, x)
        updated = False
        if selected > 0:
            loss.backward()
            updated = self.apply_update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(logits.detach(), float(loss.detach()), cache, paper, updated=updated,
                          selected=selected)


@dataclass(frozen=True)
class EATAFisherArgs(EATAArgs):
    """EATA with its anti-forgetting term: Fisher from ``fisher_images`` clean training images
    (a seeded sample of CIFAR-10's first training batch); alpha 1.0 as mariodoebler's CIFAR-10
    config (upstream's ImageNet value is 2000)."""

    fisher_alpha: float = 1.0
    fisher_images: int = 2000
    data_dir: Optional[str] = None


def clean_source_images(count: int, data_dir: Optional[str] = None, seed: int = 0):
    """``count`` clean CIFAR-10 training images as float NCHW in [0, 1] (seeded sample)."""
    import numpy as np

    from ..data import load_cifar10, to_tensor

    images, _ = load_cifar10("train", data_dir, limit=max(count, 10_000))
    chosen = np.random.default_rng(seed).choice(len(images), count, replace=False)
    return to_tensor(images[np.sort(chosen)])


@register("eata+fisher")
class EATAFisher(EATA):
    """EATA as published: needs clean source images, which fully test-time methods do not."""

    def __init__(self, model: nn.Module, args: EATAFisherArgs = EATAFisherArgs()):
        check_model(model)
        configure_model(model)
        device = next(model.parameters()).device
        images = clean_source_images(args.fisher_images, args.data_dir).to(device)
        super().__init__(model, args, fisher_information(model, images))
