"""MobileNetV2 for 32x32 images, as the authors' RPAT release ships it (``RPAT_SOTAs/networks/mobilenetv2.py``).

The usual CIFAR variant (Sandler et al. 2018, adapted as in the widespread ``pytorch-cifar`` code): a
stride-1 3x3 stem (ImageNet's is stride 2), the second bottleneck stage at stride 1 (ImageNet: 2), and
global average pooling over the final 4x4 map. Parameter names of the release: ``conv1``, ``bn1``,
``layers.{i}.{conv1, bn1, conv2, bn2, conv3, bn3[, shortcut.0, shortcut.1]}``, ``conv2``, ``bn2``,
``linear``. Like the release's VGG16, it normalizes nothing inside; rpat's ``normalize`` layer does that
when asked (``model.normalize=true``), so the model takes [0, 1] images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier
from .registry import register_model

#: (expansion, out_planes, num_blocks, stride) of each bottleneck stage, CIFAR variant.
MOBILENETV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 (``stride``) - project (1x1), each with BatchNorm, ReLU after the first two.

    ``(B, in_planes, H, W)`` -> ``(B, out_planes, H / stride, W / stride)``. At stride 1 a residual is
    added: the identity when the widths agree, else ``shortcut`` (1x1 conv + BatchNorm); at stride 2
    there is no residual (as in the release).
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Sequential | None = None
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride != 1:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class MobileNetV2(ImageClassifier):
    """CIFAR MobileNetV2: 32-channel stride-1 stem, 17 inverted residual blocks, 1x1 conv to 1280, pool, linear.

    Input ``(B, in_chans, H, W)`` in [0, 1] (H, W divisible by 8); ``forward`` returns
    ``(B, num_classes)``. Proxies: ``third_to_last`` is the output of the last bottleneck block
    (``layers``), ``(B, 320, H/8, W/8)``; ``second_to_last`` is ``relu(bn2(conv2(.)))`` globally
    average-pooled, ``(B, 1280)``, the embedding fed to ``linear``. PyTorch's default initialization.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, mean, std)
        self.conv1 = nn.Conv2d(in_chans, 32, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, n, stride in MOBILENETV2_CFG:
            for i in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)
        self.embed_dim = 1280

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(layers output (B, 320, H/8, W/8), embedding (B, 1280))``."""
        third = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(third)))
        return third, torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 1280)`` -> ``(B, num_classes)``."""
        return self.linear(features)


@register_model("mobilenetv2", aliases=("mobilenet_v2", "mobilenet-v2", "mobilenet"))
def mobilenetv2(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> MobileNetV2:
    """The RPAT release's CIFAR MobileNetV2; 2,296,922 parameters for 10 classes."""
    return MobileNetV2(num_classes, in_chans, mean, std)
