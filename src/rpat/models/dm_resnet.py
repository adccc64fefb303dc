"""The generated-data networks: Swish WideResNets and PreActResNets in DeepMind's / RobustBench's layout.

Gowal et al. 2021, Rebuffi et al. 2021 and Wang et al. 2023 ("Better diffusion models further
improve adversarial training") train these networks; RobustBench ships them as ``DMWideResNet`` /
``DMPreActResNet`` (``robustbench/model_zoo/architectures/dm_wide_resnet.py``). The modules here
have the same parameter and buffer names and shapes, so a RobustBench state_dict loads with
``strict=True``:

- WideResNet: ``mean``, ``std`` (buffers ``(C, 1, 1)``), ``init_conv``,
  ``layer.{g}.block.{i}.{batchnorm_0, conv_0, batchnorm_1, conv_1[, shortcut]}`` for groups
  ``g = 0, 1, 2``, then ``batchnorm`` and ``logits``;
- PreActResNet: ``mean``, ``std``, ``conv_2d``,
  ``layer_{s}.{i}.{batchnorm_0, conv_2d_1, batchnorm_1, conv_2d_2[, shortcut]}`` for stages
  ``s = 0..3``, then ``batchnorm`` and ``logits``.

Normalization. Unlike rpat's other models (whose ``normalize`` layer has non-persistent buffers),
these networks keep the input statistics as *persistent* buffers ``mean`` / ``std``, as RobustBench
does: they travel in every state_dict, so a loaded RobustBench checkpoint normalizes exactly as it
does in RobustBench, and a model saved by rpat loads back into RobustBench's class. The constructor's
``mean`` / ``std`` fill them; ``None`` (rpat's "no normalization") stores mean 0 and std 1, the
identity. The input stays in [0, 1].

The convolutions that can stride pad by hand as TensorFlow's ``SAME`` does (stride 1: one pixel on
each side; stride 2: one pixel right and bottom only), as in the original code, so the function
computed equals the published one bit for bit in layout. Swish is ``x * sigmoid(x)`` (``F.silu``).
Global average pooling is adaptive; at 32x32 it is the original ``avg_pool2d(8)`` / ``avg_pool2d(4)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import ImageClassifier, Normalize
from .registry import register_model

#: Blocks per stage of the DM PreActResNets (RobustBench's ``DMPreActResNet``).
PREACT_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` for a 3x3 conv with padding 0 to act like TensorFlow's ``SAME``.

    Stride 1: one zero pixel on every side (``(B, C, H + 2, W + 2)``); stride 2: one on the right
    and the bottom only (``(B, C, H + 1, W + 1)``), as DeepMind's PyTorch port does.
    """
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise InputError(f"DM blocks support stride 1 or 2, got {stride}")


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum)


class DMWideBlock(nn.Module):
    """Pre-activation wide block with Swish, DM layout: ``(B, in, H, W)`` -> ``(B, out, H/s, W/s)``.

    When ``in_planes != out_planes`` the activated input feeds both the 3x3 conv and the 1x1
    ``shortcut``; otherwise the activated input feeds the conv and the raw input is the residual.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.batchnorm_0 = _bn(in_planes, bn_momentum)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = _bn(out_planes, bn_momentum)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.silu(self.batchnorm_0(x))
        out = self.conv_0(same_pad(act, self.stride))
        out = self.conv_1(F.silu(self.batchnorm_1(out)))
        residual = x if self.shortcut is None else self.shortcut(act)
        return residual + out


class DMBlockGroup(nn.Module):
    """``num_blocks`` wide blocks as ``.block`` (a Sequential); the first changes width and stride."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.block = nn.Sequential(*(DMWideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1, bn_momentum) for i in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMPreActBlock(nn.Module):
    """Pre-activation block with Swish, DM layout: ``(B, in, H, W)`` -> ``(B, out, H/s, W/s)``.

    The shortcut (when the shape changes) is a 3x3 conv on the *raw*, SAME-padded input, as in
    DeepMind's code (not the 1x1 conv on the activated input of the usual PreActResNet).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = _bn(in_planes, bn_momentum)
        self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = _bn(out_planes, bn_momentum)
        self.conv_2d_2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.batchnorm_0(x))
        residual = x if self.shortcut is None else self.shortcut(same_pad(x, self.stride))
        out = self.conv_2d_1(same_pad(out, self.stride))
        out = self.conv_2d_2(F.silu(self.batchnorm_1(out)))
        return out + residual


class _DMStatsModel(ImageClassifier):
    """Base of the DM networks: input statistics as persistent ``mean`` / ``std`` buffers ``(C, 1, 1)``."""

    def _register_stats(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        probe = Normalize(mean, std)  # the same checks (lengths, positive std) as every rpat model
        c = self.in_chans
        if probe.enabled and len(probe.stats[0]) != c:
            raise InputError(f"normalization has {len(probe.stats[0])} channel(s) but the model has in_chans={c}")
        m, s = probe.stats if probe.enabled else ((0.0,) * c, (1.0,) * c)
        self.register_buffer("mean", torch.tensor(m).view(c, 1, 1))
        self.register_buffer("std", torch.tensor(s).view(c, 1, 1))

    def __setattr__(self, name: str, value: object) -> None:
        # rpat eval --normalize sets ``normalize``: refuse it when the buffers already normalize
        if (name == "normalize" and isinstance(value, Normalize) and value.enabled and "mean" in self._buffers
                and not self.mean.is_meta and not (bool((self.mean == 0).all()) and bool((self.std == 1).all()))):
            raise InputError(f"the model already normalizes its input with its mean/std buffers "
                             f"(mean={self.mean.flatten().tolist()}); drop --normalize")
        super().__setattr__(name, value)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the buffers; ``(B, C, H, W)`` -> same shape."""
        return (x - self.mean) / self.std


def _check_momentum(bn_momentum: float) -> None:
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0 < bn_momentum <= 1:
        raise InputError(f"bn_momentum must be a number in (0, 1], got {bn_momentum!r}")


class DMWideResNet(_DMStatsModel):
    """Swish WRN-``depth``-``width`` in DM layout: 16-channel stem, groups of widths 16k, 32k, 64k.

    Input ``(B, in_chans, H, W)`` in [0, 1] (H, W divisible by 4); ``forward`` returns
    ``(B, num_classes)`` logits. Proxies: ``third_to_last`` is the output of ``layer[1]``,
    ``(B, 32k, H/2, W/2)``; ``second_to_last`` is ``silu(batchnorm(layer[2] output))`` globally
    average-pooled, ``(B, 64k)``, the embedding fed to ``logits``.

    Initialization as in Wang et al.'s training code (``core/models/wideresnetwithswish.py``):
    convs ``N(0, 2 / (k*k*out_channels))``, BatchNorm weight 1 / bias 0, ``logits`` bias 0.
    ``bn_momentum``: PyTorch's BatchNorm momentum (0.1 default; that code trains with 0.01).
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        bn_momentum: float = 0.1,
    ):
        super().__init__(num_classes, in_chans, None, None)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise InputError(f"DM wide resnet depth must be 6n + 4 with n >= 1 (e.g. 28, 70), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"DM wide resnet width must be a positive integer, got {width!r}")
        _check_momentum(bn_momentum)
        self._register_stats(mean, std)
        n = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.depth, self.width = depth, width
        self.init_conv = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, channels[0], channels[1], 1, bn_momentum),
            DMBlockGroup(n, channels[1], channels[2], 2, bn_momentum),
            DMBlockGroup(n, channels[2], channels[3], 2, bn_momentum),
        )
        self.batchnorm = _bn(channels[3], bn_momentum)
        self.logits = nn.Linear(channels[3], num_classes)
        self.embed_dim = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(layer[1] output (B, 32k, H/2, W/2), embedding (B, 64k))``; standardizes first."""
        out = self.layer[0](self.init_conv(self.standardize(x)))
        third = self.layer[1](out)
        out = F.silu(self.batchnorm(self.layer[2](third)))
        return third, torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 64k)`` -> ``(B, num_classes)``."""
        return self.logits(features)


class DMPreActResNet(_DMStatsModel):
    """Swish PreActResNet-``depth`` (18 or 34) in DM layout: 64-channel stem, stages of 64-512 channels.

    Input ``(B, in_chans, H, W)`` in [0, 1] (H, W divisible by 8); ``forward`` returns
    ``(B, num_classes)`` logits. Proxies: ``third_to_last`` is the output of ``layer_2``,
    ``(B, 256, H/4, W/4)``; ``second_to_last`` is ``silu(batchnorm(layer_3 output))`` globally
    average-pooled, ``(B, 512)``. PyTorch's default initialization, as in the original code.
    """

    def __init__(
        self,
        depth: int = 18,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        bn_momentum: float = 0.1,
    ):
        super().__init__(num_classes, in_chans, None, None)
        if depth not in PREACT_BLOCKS:
            raise InputError(f"DM preact resnet depth must be one of {sorted(PREACT_BLOCKS)}, got {depth!r}")
        _check_momentum(bn_momentum)
        self._register_stats(mean, std)
        blocks = PREACT_BLOCKS[depth]
        self.depth = depth
        self.conv_2d = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.layer_0 = self._stage(64, 64, blocks[0], 1, bn_momentum)
        self.layer_1 = self._stage(64, 128, blocks[1], 2, bn_momentum)
        self.layer_2 = self._stage(128, 256, blocks[2], 2, bn_momentum)
        self.layer_3 = self._stage(256, 512, blocks[3], 2, bn_momentum)
        self.batchnorm = _bn(512, bn_momentum)
        self.logits = nn.Linear(512, num_classes)
        self.embed_dim = 512

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int, bn_momentum: float) -> nn.Sequential:
        return nn.Sequential(*(DMPreActBlock(in_planes if i == 0 else out_planes, out_planes,
                                             stride if i == 0 else 1, bn_momentum) for i in range(n)))

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(layer_2 output (B, 256, H/4, W/4), embedding (B, 512))``; standardizes first."""
        out = self.layer_1(self.layer_0(self.conv_2d(self.standardize(x))))
        third = self.layer_2(out)
        out = F.silu(self.batchnorm(self.layer_3(third)))
        return third, torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` -> ``(B, num_classes)``."""
        return self.logits(features)


@register_model("dm_wrn28_10_swish", aliases=("dm_wrn_28_10_swish", "wrn-28-10-swish", "dmwideresnet28_10"))
def dm_wrn28_10_swish(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bn_momentum: float = 0.1,
) -> DMWideResNet:
    """Swish WRN-28-10, DM layout (RobustBench ``Wang2023Better_WRN-28-10``); 36,479,194 parameters for 10 classes."""
    return DMWideResNet(28, 10, num_classes, in_chans, mean, std, bn_momentum)


@register_model("dm_wrn70_16_swish", aliases=("dm_wrn_70_16_swish", "wrn-70-16-swish", "dmwideresnet70_16"))
def dm_wrn70_16_swish(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bn_momentum: float = 0.1,
) -> DMWideResNet:
    """Swish WRN-70-16, DM layout (RobustBench ``Wang2023Better_WRN-70-16``); 266,796,506 parameters for 10 classes."""
    return DMWideResNet(70, 16, num_classes, in_chans, mean, std, bn_momentum)


@register_model("dm_preact_resnet18_swish", aliases=("dm_preactresnet18_swish", "preact-resnet18-swish"))
def dm_preact_resnet18_swish(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bn_momentum: float = 0.1,
) -> DMPreActResNet:
    """Swish PreActResNet-18, DM layout (RobustBench ``Rebuffi2021Fixing_R18_ddpm``); 12,548,426 params."""
    return DMPreActResNet(18, num_classes, in_chans, mean, std, bn_momentum)
