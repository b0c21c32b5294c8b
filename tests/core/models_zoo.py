"""Small models covering every layer kind the capture layer must handle."""

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.vision_transformer import VisionTransformer

from surgeon_core.models import resnet20


class MixedNet(nn.Module):
    """GroupNorm, LayerNorm, GELU, in-place ReLU, a residual add, a functional ReLU, a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.ln = nn.LayerNorm(32)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = self.relu(self.gn(self.conv1(x)))
        h = torch.relu(self.conv2(h)) + h  # functional: stored exactly, still correct
        h = torch.flatten(self.pool(h), 1)
        return self.fc(self.gelu(self.ln(h)))


def small_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


MODELS = {
    "cifar_resnet20": lambda: resnet20(),
    "torchvision_resnet18": lambda: resnet18(num_classes=10),
    "torchvision_mobilenet_v2": lambda: mobilenet_v2(num_classes=10),
    "torchvision_vit": small_vit,
    "mixed": MixedNet,
}
