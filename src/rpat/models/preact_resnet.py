"""Pre-activation ResNet-18 for small images (CIFAR variant).

Parameter names follow the common public CIFAR PreActResNet used by the
robust-overfitting and fast adversarial training code: ``conv1``,
``layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2,shortcut.0}``, ``bn``, ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier, make_stage
from .registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice plus a residual; the shortcut (a 1x1 conv, no BN) acts on the activated input.

    ``(B, in_planes, H, W)`` -> ``(B, planes, H / stride, W / stride)``. When
    the shape is unchanged the shortcut is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class PreActResNet(ImageClassifier):
    """CIFAR pre-activation ResNet: 3x3 stride-1 stem conv, four stages, final BN-ReLU, global average pooling.

    Input ``(B, in_chans, H, W)`` in [0, 1], e.g. 32x32 or 64x64 (the pooling
    is adaptive); ``forward`` returns logits ``(B, num_classes)``. Spatial
    sizes below assume ``H, W`` divisible by 8.

    Proxies: ``third_to_last`` is the output of ``layer3`` (a pre-activation
    residual sum), ``(B, 256, H/4, W/4)``; ``second_to_last`` is
    ``relu(bn(layer4 output))`` globally average-pooled, ``(B, 512)``, the
    embedding fed to ``linear``.

    Initialization is PyTorch's default (Kaiming-uniform convs and linear, BN
    weight 1 / bias 0), as in the public code these checkpoints come from.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, mean, std)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = make_stage(PreActBlock, 64, 64, num_blocks[0], stride=1)
        self.layer2 = make_stage(PreActBlock, 64, 128, num_blocks[1], stride=2)
        self.layer3 = make_stage(PreActBlock, 128, 256, num_blocks[2], stride=2)
        self.layer4 = make_stage(PreActBlock, 256, 512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)
        self.embed_dim = 512

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(layer3 output (B, 256, H/4, W/4), embedding (B, 512))``."""
        out = self.conv1(x)
        third = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn(self.layer4(third)))
        second = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return third, second

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` -> ``(B, num_classes)``."""
        return self.linear(features)


@register_model("preact_resnet18", aliases=("preactresnet18", "preact_resnet_18", "preact18", "preactrn18"))
def preact_resnet18(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> PreActResNet:
    """Pre-activation ResNet-18 (blocks [2, 2, 2, 2], widths 64-512)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_chans, mean, std)
