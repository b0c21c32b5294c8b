"""EcoTTA's warm-up on source data: train only the meta networks with cross-entropy.

Community defaults (../shared/research/baselines.md section 5): SGD momentum 0.9 at lr 5e-2, one
epoch of linear warm-up, MultiStepLR at epochs 3, 6 and 8 with gamma 0.2, batch 64; colour
jitter (p 0.4), Gaussian blur (p 0.2) and greyscale (p 0.1), plus horizontal flips. The frozen
BatchNorms normalise with the batch, as they will at test time, but with momentum 0 so that the
original network's buffers stay as they are. The meta BatchNorms start calibrated (NOTE in
models/ecotta_net.py), so the network starts where the original is. At the end every norm's
running statistics are recalibrated on clean images in the batch-statistics regime training ran
in; the frozen norms' new statistics go into the file, and the caller's model keeps its own.

Progress is saved every ``save_every`` iterations to ``<out>.partial``; a later run with the same
``out`` continues from there. The finished file holds the meta networks, the partition table,
the hash of the original weights it belongs to, and the clean test accuracy of both networks,
each in eval mode and on the statistics of test batches of 200 (how adaptation predicts).
"""

import copy
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..methods.ecotta import save_warmup, weights_hash
from ..models.ecotta_net import EcoTTANet

__all__ = ["augment", "warm_up", "accuracy", "WarmupSettings"]


class WarmupSettings:
    def __init__(self, epochs: int = 10, batch_size: int = 64, lr: float = 0.05,
                 milestones=(3, 6, 8), gamma: float = 0.2, seed: int = 0,
                 save_every: int = 100, max_iterations: Optional[int] = None):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.milestones, self.gamma, self.seed = tuple(milestones), gamma, seed
        self.save_every, self.max_iterations = save_every, max_iterations


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip, colour jitter (p 0.4), greyscale (p 0.1) and 3x3 Gaussian blur (p 0.2), per image."""
    n = x.shape[0]

    def chance(p):
        return (torch.rand(n, 1, 1, 1, generator=gen) < p).to(x.dtype).to(x.device)

    def factor(spread):
        return (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * spread).to(x.device)

    flip = chance(0.5)
    x = flip * x.flip(3) + (1 - flip) * x
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    jitter = chance(0.4)
    jittered = x * factor(0.4)                                             # brightness
    jittered = (jittered - jittered.mean((1, 2, 3), keepdim=True)) * factor(0.4) \
        + jittered.mean((1, 2, 3), keepdim=True)                           # contrast
    jittered = gray + (jittered - gray) * factor(0.4)                      # saturation
    x = jitter * jittered + (1 - jitter) * x
    to_gray = chance(0.1)
    x = to_gray * gray.expand_as(x) + (1 - to_gray) * x
    blur = chance(0.2)
    sigma = (0.1 + torch.rand(n, generator=gen) * 1.9).to(x.device)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device)[None] / (2 * sigma[:, None]
                                                                                ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps[:, :, None] * taps[:, None, :])                         # (n, 3, 3)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1)                       # n, c, h, w, 3, 3
    blurred = (patches * kernel[:, None, None, None]).sum((-1, -2))
    x = blur * blurred + (1 - blur) * x
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500, batch_statistics: bool = False) -> float:
    """Top-1 accuracy in eval mode, or with every norm on the statistics of its batch (on a
    copy, so that no running statistic moves)."""
    was_training = model.training
    if batch_statistics:
        model = copy.deepcopy(model)
    model.train(batch_statistics)
    right = 0
    for i in range(0, len(images), batch_size):
        right += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return right / len(images)


def clean_accuracy(model: nn.Module, test) -> Dict[str, float]:
    return {"eval": accuracy(model, *test),
            "batch_statistics_200": accuracy(model, *test, batch_size=200, batch_statistics=True)}


def _prepare(net: EcoTTANet) -> None:
    for param in net.original_parameters:
        param.requires_grad_(False)
    net.train()
    for norm in net.frozen_norms():
        norm._warmup_momentum, norm.momentum = norm.momentum, 0.0   # buffers untouched


def _restore_momentum(net: EcoTTANet) -> None:
    for norm in net.frozen_norms():
        norm.momentum = getattr(norm, "_warmup_momentum", norm.momentum)


def _lr_at(settings: WarmupSettings, epoch: int, iteration: int, per_epoch: int) -> float:
    lr = settings.lr * settings.gamma ** sum(epoch >= m for m in settings.milestones)
    if epoch == 0:
        lr *= (iteration + 1) / per_epoch
    return lr


def warm_up(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path,
            settings: WarmupSettings, test=None, progress: Optional[Callable] = None,
            device: torch.device = torch.device("cpu"),
            identity: Optional[Dict] = None) -> Dict:
    """Train the meta networks of ``model`` on (images, labels); write ``out``; its info."""
    model = model.to(device)
    source_hash = weights_hash(model)
    original_accuracy = clean_accuracy(model, test) if test is not None else None
    net = EcoTTANet(model).to(device)
    original_norms = net.frozen_norm_state()
    gen = torch.Generator().manual_seed(settings.seed)
    net.calibrate(images[:2048].to(device))
    _prepare(net)
    optimizer = torch.optim.SGD(net.meta_parameters(), lr=settings.lr, momentum=0.9)
    partial = Path(str(out) + ".partial")
    epoch, iteration, elapsed, losses = _resume(partial, net, optimizer, source_hash)
    per_epoch = math.ceil(len(images) / settings.batch_size)
    total = settings.epochs * per_epoch if settings.max_iterations is None \
        else min(settings.max_iterations, settings.epochs * per_epoch)
    done = epoch * per_epoch + iteration
    start = time.perf_counter() - elapsed
    while done < total:
        order = np.random.default_rng(settings.seed + epoch).permutation(len(images))
        for i in range(iteration, per_epoch):
            if done >= total:
                break
            idx = torch.from_numpy(order[i * settings.batch_size:(i + 1) * settings.batch_size])
            x = augment(images[idx].to(device), gen)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(settings, epoch, i, per_epoch)
            loss = nn.functional.cross_entropy(net(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            done += 1
            if progress is not None:
                progress(1)
            if done % settings.save_every == 0:
                _save_partial(partial, net, optimizer, epoch, i + 1, time.perf_counter() - start,
                              losses, source_hash)
        else:
            epoch, iteration = epoch + 1, 0
    _restore_momentum(net)
    net.recalibrate(images[:4096].to(device))
    seconds = time.perf_counter() - start
    info = {"epochs": settings.epochs, "iterations": done, "seconds": round(seconds, 1),
            "batch_size": settings.batch_size, "lr": settings.lr, "train_images": len(images),
            "first_losses": losses[:20], "last_losses": losses[-20:]}
    if test is not None:
        info["clean_accuracy"] = {"original": original_accuracy,
                                  "with_meta": clean_accuracy(net, test)}
    save_warmup(out, net, source_hash, info, identity)
    net.load_frozen_norm_state(original_norms)     # the caller's model, as it was
    if partial.exists():
        partial.unlink()
    return info


def _save_partial(path: Path, net, optimizer, epoch, iteration, elapsed, losses, source_hash):
    tmp = Path(str(path) + ".tmp")
    torch.save({"meta_state": net.metas.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "iteration": iteration, "elapsed": elapsed,
                "losses": losses, "weights_hash": source_hash}, tmp)
    tmp.replace(path)


def _resume(path: Path, net, optimizer, source_hash):
    if not path.exists():
        return 0, 0, 0.0, []
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if state.get("weights_hash") != source_hash:
        raise ValueError("%s belongs to other weights; delete it to start afresh" % path)
    net.metas.load_state_dict(state["meta_state"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["iteration"], state["elapsed"], list(state["losses"])
