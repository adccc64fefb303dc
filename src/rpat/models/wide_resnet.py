"""Wide ResNets (WRN-34-10, WRN-28-10) for small images.

Parameter names follow the public WideResNet of the TRADES / MART code:
``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1`` (the final BN) and ``fc``. The TRADES checkpoints also hold an unused
``sub_block1``; it is not built here and :func:`rpat.models.load_weights` drops
its keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import ImageClassifier, make_stage
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a residual.

    ``(B, in_planes, H, W)`` -> ``(B, out_planes, H / stride, W / stride)``.
    When ``in_planes != out_planes`` the shortcut is a 1x1 conv (``convShortcut``)
    applied to the *activated* input; otherwise it is the identity on the raw
    input (as in the public code, so its checkpoints compute the same function).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None  # noqa: N815 -- public checkpoint name
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        residual = x if self.convShortcut is None else self.convShortcut(act)
        return out + residual


class WideGroup(nn.Module):
    """A group of ``n`` wide blocks; the first changes width and stride. Named ``block{k}`` with ``.layer``."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.layer = make_stage(partial(WideBasicBlock, dropout=dropout), in_planes, out_planes, n, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ImageClassifier):
    """WRN-``depth``-``widen_factor``: a 16-channel 3x3 stem, three groups of widths 16k, 32k, 64k.

    Each group has ``(depth - 4) / 6`` blocks; the second and third halve the
    resolution. Then BN-ReLU, global average pooling and ``fc``.

    Input ``(B, in_chans, H, W)`` in [0, 1], e.g. 32x32 or 64x64 (the pooling
    is adaptive); ``forward`` returns logits ``(B, num_classes)``. Spatial
    sizes below assume ``H, W`` divisible by 4.

    Proxies: ``third_to_last`` is the output of ``block2``,
    ``(B, 32k, H/2, W/2)``; ``second_to_last`` is ``relu(bn1(block3 output))``
    globally average-pooled, ``(B, 64k)``, the embedding fed to ``fc``.

    Initialization as in the public code: convs ``N(0, 2 / (k*k*out_channels))``
    (Kaiming normal, fan-out), BN weight 1 / bias 0, ``fc`` bias 0.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, mean, std)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise InputError(f"wide resnet depth must be 6n + 4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise InputError(f"wide resnet widen_factor must be a positive integer, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, dropout)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, dropout)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.embed_dim = widths[3]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(block2 output (B, 32k, H/2, W/2), embedding (B, 64k))``."""
        third = self.block2(self.block1(self.conv1(x)))
        out = F.relu(self.bn1(self.block3(third)))
        second = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return third, second

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 64k)`` -> ``(B, num_classes)``."""
        return self.fc(features)


def wide_resnet(
    depth: int,
    widen_factor: int,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> WideResNet:
    """A WRN of any valid depth (6n + 4) and widen factor."""
    return WideResNet(depth, widen_factor, dropout, num_classes, in_chans, mean, std)


@register_model("wrn34_10", aliases=("wrn3410", "wrn-34-10", "wideresnet34_10", "wide_resnet34_10"))
def wrn34_10(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-34-10 (5 blocks per group, widths 16/160/320/640); 46,160,474 parameters for 10 classes."""
    return wide_resnet(34, 10, dropout, num_classes, in_chans, mean, std)


@register_model("wrn28_10", aliases=("wrn2810", "wrn-28-10", "wideresnet28_10", "wide_resnet28_10"))
def wrn28_10(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-28-10 (4 blocks per group, widths 16/160/320/640); 36,479,194 parameters for 10 classes."""
    return wide_resnet(28, 10, dropout, num_classes, in_chans, mean, std)
