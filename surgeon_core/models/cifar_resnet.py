"""CIFAR ResNet-(6n+2) of He et al. 2016, section 4.2, with the parameter-free option-A shortcut.

Rebuilt from the architecture description that ships with the pretrained checkpoints; the module
names match their state dicts. Every activation is an ``nn.ReLU`` module (never ``F.relu``) so that
the capture layer knows which tensors are ReLU outputs. Input normalisation lives in the model.
"""

from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "IMAGENET_MEAN", "IMAGENET_STD"]

# The published CIFAR checkpoints were trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NormLayer = Callable[[int], nn.Module]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on [0, 1] NCHW input; buffers stay out of the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad channels evenly on both sides (no parameters)."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(planes // 4) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NOTE [Stage inputs die early]
        Where a tensor is freed sets what a step holds at its peak (issue 15), and a sparse
        cache no longer hides a dense tensor kept too long. Python keeps a call's arguments
        until the call returns, so each call here is a statement of its own: in
        ``bn2(conv2(out))`` the ReLU's output would live through the norm, and in
        ``layer2(layer1(x))`` the stem's output through every stage (the model calls its blocks
        one by one for the same reason: a Sequential's call holds the stage's input). The
        shortcut comes first: autograd runs later nodes first, so its backward (a full-size
        zero gradient at a stride-2 block) now waits until the branch's convolutions are done
        instead of sitting beside their temporaries (figures: BENCHMARKS.md, issue 15).
        """
        shortcut = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = self.bn2(out)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, three stages of ``n`` blocks (16/32/64 wide), pool, linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10,
                 norm_layer: Optional[NormLayer] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages: List[nn.Sequential] = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, norm_layer))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        self.depth = 6 * blocks_per_stage + 2
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        for block in self._blocks():
            x = block(x)
        return self.linear(torch.flatten(self.avgpool(x), 1))

    def _blocks(self) -> Iterator[nn.Module]:
        # not through the stages' Sequential, whose call holds the stage's input to its end
        # (NOTE [Stage inputs die early])
        for stage in (self.layer1, self.layer2, self.layer3):
            yield from stage


def _resnet(depth: int, **kwargs) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError("CIFAR ResNet depth must be 6n+2, got %d" % depth)
    return CifarResNet((depth - 2) // 6, **kwargs)


def resnet20(**kwargs) -> CifarResNet:
    return _resnet(20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return _resnet(32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    return _resnet(44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return _resnet(56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    return _resnet(110, **kwargs)
