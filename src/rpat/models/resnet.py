"""ResNet-18 for small images (CIFAR variant).

Parameter names follow the widely used public CIFAR ResNet (``conv1``, ``bn1``,
``layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``,
``linear``), so its checkpoints -- e.g. the example model shipped with
pyautoattack -- load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier, make_stage
from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a residual; the shortcut is a 1x1 conv + BN when the shape changes.

    ``(B, in_planes, H, W)`` -> ``(B, planes, H / stride, W / stride)``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """CIFAR ResNet: 3x3 stride-1 stem (no max-pool), four stages of basic blocks, global average pooling.

    Input ``(B, in_chans, H, W)`` in [0, 1], e.g. 32x32 or 64x64 (the pooling
    is adaptive); ``forward`` returns logits ``(B, num_classes)``. Spatial
    sizes below assume ``H, W`` divisible by 8.

    Proxies: ``third_to_last`` is the output of ``layer3``,
    ``(B, 256, H/4, W/4)``; ``second_to_last`` is the globally average-pooled
    output of ``layer4``, ``(B, 512)``, the embedding fed to ``linear``.

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
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(BasicBlock, 64, 64, num_blocks[0], stride=1)
        self.layer2 = make_stage(BasicBlock, 64, 128, num_blocks[1], stride=2)
        self.layer3 = make_stage(BasicBlock, 128, 256, num_blocks[2], stride=2)
        self.layer4 = make_stage(BasicBlock, 256, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512, num_classes)
        self.embed_dim = 512

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(layer3 output (B, 256, H/4, W/4), pooled layer4 (B, 512))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        third = self.layer3(self.layer2(self.layer1(out)))
        out = self.layer4(third)
        second = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return third, second

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` -> ``(B, num_classes)``."""
        return self.linear(features)


@register_model("resnet18", aliases=("resnet_18", "resnet-18"))
def resnet18(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2], widths 64-512); 11,173,962 parameters for 10 classes."""
    return ResNet((2, 2, 2, 2), num_classes, in_chans, mean, std)
