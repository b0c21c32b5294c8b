"""EcoTTA's network: the frozen encoder split into K partitions, a small meta network beside each.

Facts: ../shared/research/baselines.md section 5 (the authors' sample code, as the community
repository quotes it). Each partition k of consecutive residual blocks keeps its frozen weights;
its meta network adds a BatchNorm on the partition's output and a 3x3 conv-BN-ReLU branch from
the partition's input (stride = input size / output size), and the partition's output becomes
``meta_bn(f_k(x)) + conv_block(x)``. Only meta parameters train.

Choices of ours, where the facts are silent:
- the branch's BN starts with gamma 0.01, so the branch adds almost nothing at first (exactly 0
  would keep its ReLU, and so the branch, from ever receiving a gradient);
- ``calibrate`` sets each meta_bn's affine and running statistics to the per-channel mean and
  std of the frozen output on source images, so before any training the network computes what
  the original does (in eval mode exactly, in train mode up to the batch's statistics).
"""

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .preprocess import INPUT_NORM

BRANCH_GAMMA = 0.01

__all__ = ["PARTITIONS", "MetaNetwork", "EcoTTANet", "partitions_for", "residual_blocks"]

# blocks per partition, finer in the shallow part; K = 4 throughout
PARTITIONS: Dict[str, Tuple[int, ...]] = {
    "resnet20": (2, 2, 2, 3), "resnet32": (3, 3, 4, 5), "resnet44": (4, 4, 6, 7),
    "resnet56": (4, 5, 9, 9), "resnet110": (9, 9, 18, 18),                  # CIFAR ResNets
    "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 4, 5), "resnet50": (3, 3, 5, 5),  # torchvision
    "resnet101": (3, 4, 12, 14),
}


def residual_blocks(model: nn.Module) -> List[nn.Module]:
    """The residual blocks in order: layer1..layer4 of CIFAR and torchvision ResNets."""
    blocks = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, name, None)
        if stage is not None:
            blocks.extend(stage.children())
    if not blocks:
        raise ValueError("EcoTTA needs a ResNet-style model (layer1, layer2, ... of blocks)")
    return blocks


def architecture_name(model: nn.Module) -> str:
    depth = getattr(model, "depth", None)
    if depth is not None:
        return "resnet%d" % depth
    blocks = residual_blocks(model)
    bottleneck = hasattr(blocks[0], "conv3")
    return {(8, False): "resnet18", (16, False): "resnet34", (16, True): "resnet50",
            (33, True): "resnet101"}.get((len(blocks), bottleneck), "unknown")


def partitions_for(model: nn.Module) -> Tuple[int, ...]:
    name = architecture_name(model)
    if name not in PARTITIONS:
        raise ValueError("no EcoTTA partition table for %s; pass partitions=(...)" % name)
    return PARTITIONS[name]


class MetaNetwork(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.meta_bn = nn.BatchNorm2d(out_channels)
        self.conv_block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        # small, not zero: a zero gamma before the ReLU would leave the branch dead for good
        nn.init.constant_(self.conv_block[1].weight, BRANCH_GAMMA)


class _Stem(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        # input_normalize: what attach_normalization adds to a torchvision model (its pre-hook
        # does not run here, since the stem calls the parts one by one)
        names = [INPUT_NORM, "normalize", "conv1", "bn1", "relu", "maxpool"]
        self.parts = nn.ModuleList(getattr(model, n) for n in names if hasattr(model, n))

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.pool = model.avgpool
        self.fc = getattr(model, "linear", None) or model.fc

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class EcoTTANet(nn.Module):
    """The original ResNet (frozen) with one meta network per partition.

    Args:
        model: a CIFAR or torchvision ResNet; its modules are shared, not copied.
        partitions: blocks per partition (default: PARTITIONS for the architecture).
        input_size: an image size for the shape probe that sets the branch strides.
    """

    def __init__(self, model: nn.Module, partitions: Sequence[int] = (), input_size: int = 32):
        super().__init__()
        blocks = residual_blocks(model)
        sizes = tuple(partitions) or partitions_for(model)
        if sum(sizes) != len(blocks) or min(sizes) < 1:
            raise ValueError("partitions %s do not split the %d blocks" % (sizes, len(blocks)))
        self.arch = architecture_name(model)
        self.sizes = sizes
        self.stem, self.head = _Stem(model), _Head(model)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.partitions = nn.ModuleList(nn.Sequential(*blocks[a:b])
                                        for a, b in zip(bounds, bounds[1:]))
        self.metas = nn.ModuleList(self._make_metas(input_size))
        self.original_parameters = [p for p in model.parameters()]

    @torch.no_grad()
    def _make_metas(self, input_size: int) -> List[MetaNetwork]:
        was_training = self.training
        self.stem.eval(), self.partitions.eval()
        h = self.stem(torch.zeros(1, 3, input_size, input_size,
                                  device=next(self.stem.parameters()).device))
        metas = []
        for part in self.partitions:
            out = part(h)
            stride = h.shape[-1] // out.shape[-1]
            metas.append(MetaNetwork(h.shape[1], out.shape[1], stride).to(h.device))
            h = out
        self.stem.train(was_training), self.partitions.train(was_training)
        return metas

    def meta_parameters(self) -> List[nn.Parameter]:
        return list(self.metas.parameters())

    def frozen_modules(self) -> List[nn.Module]:
        return [self.stem, self.partitions, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor, detach_inputs: bool = False):
        """(logits, [(meta-augmented output, frozen output) per partition]); with
        ``detach_inputs`` each partition sees a detached input, so a loss on partition k's
        outputs reaches meta network k only (the self-distilled regulariser's pass)."""
        h = self.stem(x)
        pairs = []
        for part, meta in zip(self.partitions, self.metas):
            inp = h.detach() if detach_inputs else h
            frozen = part(inp)
            h = meta.meta_bn(frozen) + meta.conv_block(inp)
            pairs.append((h, frozen))
        return self.head(h), pairs

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """meta_bn := the identity on the frozen outputs' per-channel statistics of ``images``."""
        sums: List[torch.Tensor] = []
        squares: List[torch.Tensor] = []
        counts: List[int] = []
        was_training = self.training
        self.eval()
        for i in range(0, len(images), batch_size):
            h = self.stem(images[i:i + batch_size])
            for k, part in enumerate(self.partitions):
                h = part(h)
                flat = h.transpose(0, 1).flatten(1).double()
                if len(sums) <= k:
                    sums.append(torch.zeros_like(flat[:, 0]))
                    squares.append(torch.zeros_like(flat[:, 0]))
                    counts.append(0)
                sums[k] += flat.sum(1)
                squares[k] += (flat ** 2).sum(1)
                counts[k] += flat.shape[1]
        for meta, total, square, n in zip(self.metas, sums, squares, counts):
            mean = total / n
            var = (square / n - mean ** 2).clamp_min(1e-5)
            bn = meta.meta_bn
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_((var + bn.eps).sqrt().float())
            bn.bias.copy_(mean.float())
        self.train(was_training)

    @torch.no_grad()
    def recalibrate(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Every BatchNorm's running statistics, frozen ones included, := their average over
        ``images`` with every norm on the batch's statistics, the regime of warm-up and
        adaptation. The augmented warm-up leaves meta statistics that do not fit clean inputs,
        and the original's own statistics do not fit meta-augmented features; an eval-mode
        network (per-frame serving) needs both to match what training saw."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        was_training = self.training
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None            # a cumulative average
        self.train()
        for i in range(0, len(images), batch_size):
            self(images[i:i + batch_size])
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        self.train(was_training)

    def frozen_norms(self) -> List[nn.Module]:
        return [m for module in self.frozen_modules() for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def frozen_norm_state(self) -> Dict[str, torch.Tensor]:
        """The frozen BatchNorms' running statistics (buffers, not weights), by state_dict key."""
        ids = {id(m) for m in self.frozen_norms()}
        return {"%s.%s" % (name, key): buf.detach().cpu().clone()
                for name, m in self.named_modules() if id(m) in ids
                for key, buf in m.named_buffers(recurse=False)}

    def load_frozen_norm_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load ``frozen_norm_state``'s output; ValueError, changing nothing, if it does not fit."""
        own = self.frozen_norm_state()
        if own.keys() != state.keys():
            raise ValueError("norm statistics for other layers: %s"
                             % sorted(own.keys() ^ state.keys())[:4])
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError("%s has shape %s, not %s"
                                 % (key, tuple(value.shape), tuple(own[key].shape)))
        self.load_state_dict(state, strict=False)
