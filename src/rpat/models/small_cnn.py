"""A small CNN that trains in minutes on a CPU (32x32 RGB) and also fits 8x8 grey-scale digits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import ImageClassifier
from .registry import register_model


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SmallCNN(ImageClassifier):
    """conv-BN-ReLU x2 (32w ch), max-pool, conv-BN-ReLU x2 (64w ch), adaptive max-pool to 4x4, fc(256), fc.

    ``w`` is ``width``. Input ``(B, in_chans, H, W)`` in [0, 1], any size from
    8x8 (digits) up (32x32 CIFAR, 64x64); the first pool uses ``ceil_mode`` and
    the second is adaptive, so the classifier always sees ``64w * 4 * 4``
    features and the parameter count does not depend on the input size
    (330,730 for width 1, 3 channels, 10 classes). ``forward`` returns logits
    ``(B, num_classes)``.

    Proxies: ``third_to_last`` is the pooled conv feature map fed (flattened)
    to ``fc1``, ``(B, 64w, 4, 4)``; ``second_to_last`` is the ``fc1``
    activation ``relu(fc1(.))``, ``(B, 256)``, the embedding fed to ``fc2``.

    Initialization: convs Kaiming normal (fan-out, ReLU), BN weight 1 / bias 0,
    linear layers PyTorch's default.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width: int = 1,
        hidden: int = 256,
    ):
        super().__init__(num_classes, in_chans, mean, std)
        for arg, value in (("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"small_cnn {arg} must be a positive integer, got {value!r}")
        c1, c2 = 32 * width, 64 * width
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, c1),
            _conv_bn_relu(c1, c1),
            nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn_relu(c1, c2),
            _conv_bn_relu(c2, c2),
            nn.AdaptiveMaxPool2d(4),
        )
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.embed_dim = hidden
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(pooled conv map (B, 64w, 4, 4), fc1 activation (B, 256))``."""
        third = self.features(x)
        second = F.relu(self.fc1(torch.flatten(third, 1)))
        return third, second

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 256)`` -> ``(B, num_classes)``."""
        return self.fc2(features)


@register_model("small_cnn", aliases=("smallcnn", "small-cnn"))
def small_cnn(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 1,
) -> SmallCNN:
    """The small CNN; ``width`` multiplies the conv channels (32w, 64w)."""
    return SmallCNN(num_classes, in_chans, mean, std, width=width)
