"""EcoTTA: frozen network, small meta networks, entropy plus self-distilled regularisation.

Paper: Song et al., EcoTTA: Memory-Efficient Continual Test-time Adaptation via Self-distilled
Regularization, CVPR 2023. Facts: ../shared/research/baselines.md section 5 (the authors' sample
code for the architecture and regulariser; community defaults for the rest).

Loss per batch: the entropy of the samples below 0.4 ln C, plus lambda (0.25) times the sum over
partitions of mean |meta-augmented output - frozen output|, computed in a pass whose partition
inputs are detached so that each term reaches its own meta network only. SGD, lr 5e-3, momentum
0.9. All BatchNorms normalise with the batch (train mode), as the community code runs it; only
meta-network parameters are trained, so the original weights stay bit-identical (their BN
running statistics follow the stream, which per-frame serving needs). The entropy pass and the
regulariser pass each backpropagate before the next starts, and their gradients share one
optimizer step (the community code takes two); predictions come from the entropy pass, before
the step. A batch with no sample under the threshold is not adapted at all.

EcoTTA needs a warm-up on source data before deployment (``surgeon-bench ecotta-warmup``); the
method refuses to start without the warm-up file made for this very model. The file also holds
the frozen BatchNorms' running statistics recalibrated with the meta networks in place (buffers,
not weights: adaptation moves them with the stream anyway), so eval-mode serving starts from
statistics that fit the meta-augmented network.

The cache is measured through the lossless capture (NOTE [Cache bytes]): gradients equal plain
autograd's, frozen convolutions keep no input and ReLU outputs are bit masks, which is how an
implementation realises EcoTTA's memory claim.
"""

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..capture import ActivationCapture, CapturePolicy
from ..errors import SurgeonError
from ..models.ecotta_net import EcoTTANet
from .base import Method, StepResult, entropy
from .registry import register

__all__ = ["EcoTTAArgs", "EcoTTA", "WarmupError", "weights_hash", "save_warmup", "load_warmup",
           "WARMUP_FORMAT", "WARMUP_HELP"]

WARMUP_FORMAT = "surgeon-ecotta-warmup"
WARMUP_VERSION = 2       # 2: the frozen norms' recalibrated statistics travel with the metas
WARMUP_HELP = ("make one with: surgeon-bench ecotta-warmup --model %s --weights WEIGHTS "
               "--epochs 10 --out FILE, then pass warmup=FILE")


class WarmupError(SurgeonError, ValueError):
    """A missing, damaged or mismatched EcoTTA warm-up file."""


@dataclass(frozen=True)
class EcoTTAArgs:
    warmup: Optional[str] = None          # the file `surgeon-bench ecotta-warmup` wrote
    lr: float = 5e-3
    momentum: float = 0.9
    margin: float = 0.4                   # entropy threshold, times ln C
    reg_weight: float = 0.25              # lambda of the self-distilled regulariser


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: the warm-up belongs to these weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def save_warmup(path: Path, net: EcoTTANet, source_hash: str, info: Dict[str, Any],
                identity: Optional[Dict[str, Any]] = None) -> None:
    """``identity``: the model's (builder, num_classes, input_size, weights), when known."""
    payload = {"format": WARMUP_FORMAT, "version": WARMUP_VERSION, "arch": net.arch,
               "model": identity,
               "partitions": list(net.sizes), "weights_hash": source_hash,
               "meta_state": {k: v.detach().cpu() for k, v in net.metas.state_dict().items()},
               "frozen_norms": net.frozen_norm_state(), "info": info}
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_warmup(path: Optional[str], model: nn.Module,
                identity: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The warm-up payload for ``model`` (original weights); WarmupError says what is wrong.

    ``identity`` (the model's builder, num_classes, input size and weights fingerprint) is also
    compared with the one the file records, when both are known.
    """
    from ..models.ecotta_net import architecture_name

    arch = architecture_name(model)
    if not path:
        raise WarmupError("ecotta needs a warm-up file for %s: " % arch + WARMUP_HELP % arch)
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WarmupError("ecotta warm-up file %s does not exist; " % path
                          + WARMUP_HELP % arch) from None
    except Exception as exc:  # noqa: BLE001 - anything that fails to unpickle safely
        raise WarmupError("ecotta warm-up file %s cannot be read (%s)" % (path, exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != WARMUP_FORMAT:
        raise WarmupError("%s is not an ecotta warm-up file" % path)
    if payload.get("version") != WARMUP_VERSION:
        raise WarmupError("%s has warm-up format %s, this surgeon reads %d; "
                          % (path, payload.get("version"), WARMUP_VERSION) + WARMUP_HELP % arch)
    if payload.get("arch") != arch or payload.get("weights_hash") != weights_hash(model):
        raise WarmupError("%s was made for %s weights %s, not for this %s (weights %s); "
                          % (path, payload.get("arch"), payload.get("weights_hash"), arch,
                             weights_hash(model)) + WARMUP_HELP % arch)
    theirs = payload.get("model")
    if identity is not None and isinstance(theirs, dict) and theirs != identity:
        raise WarmupError("%s was made for %s, not for %s; " % (path, _identity_text(theirs),
                                                                 _identity_text(identity))
                          + WARMUP_HELP % arch)
    return payload


def _identity_text(identity: Dict[str, Any]) -> str:
    return "%s (%s classes, %s px, weights %s)" % (
        identity.get("builder"), identity.get("num_classes"), identity.get("input_size"),
        identity.get("weights"))


def build_net(model: nn.Module, payload: Dict[str, Any]) -> EcoTTANet:
    net = EcoTTANet(model, payload["partitions"])
    try:
        net.metas.load_state_dict(payload["meta_state"])
        net.load_frozen_norm_state(payload["frozen_norms"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WarmupError("warm-up meta networks do not fit this model: %s" % exc) from None
    return net


def freeze_original(net: EcoTTANet) -> None:
    for param in net.original_parameters:
        param.requires_grad_(False)
    for param in net.meta_parameters():
        param.requires_grad_(True)


@register("ecotta")
class EcoTTA(Method):
    def __init__(self, model: nn.Module, args: EcoTTAArgs = EcoTTAArgs()):
        payload = load_warmup(args.warmup, model)
        net = build_net(model, payload).to(next(model.parameters()).device)
        freeze_original(net)
        net.train()
        optimizer = torch.optim.SGD(net.meta_parameters(), lr=args.lr, momentum=args.momentum)
        super().__init__(net, optimizer)
        self.args = args
        self._meter = ActivationCapture(net, CapturePolicy.lossless())

    def _adapt(self, x: torch.Tensor) -> StepResult:
        # the two passes run and backpropagate one after the other, so the cache is the larger
        # of the two graphs, never both; their gradients add up into one step
        (logits, ent_loss, selected), cache, paper = self.metered_forward(self._entropy, x)
        if selected == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(logits.detach(), 0.0, cache, paper, selected=0)
        ent_loss.backward()
        reg_loss, reg_cache, reg_paper = self.metered_forward(self._regulariser, x)
        (self.args.reg_weight * reg_loss).backward()
        updated = self.apply_update()
        loss = float(ent_loss.detach()) + self.args.reg_weight * float(reg_loss.detach())
        return StepResult(logits.detach(), loss, max(cache, reg_cache), max(paper, reg_paper),
                          updated=updated, selected=selected)

    def _entropy(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        logits = self.model(x)
        ent = entropy(logits)
        keep = ent < self.args.margin * math.log(logits.shape[1])
        selected = int(keep.sum())
        return logits, (ent[keep].mean() if selected else ent.sum() * 0.0), selected

    def _regulariser(self, x: torch.Tensor) -> torch.Tensor:
        """Self-distillation: each meta-augmented output stays near the frozen one; detached
        partition inputs keep each term on its own meta network."""
        _, pairs = self.model.forward_features(x, detach_inputs=True)
        return sum((aug - frozen.detach()).abs().mean() for aug, frozen in pairs)
