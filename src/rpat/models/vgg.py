"""VGG-16 with BatchNorm for 32x32 images, as the authors' RPAT release ships it (``RPAT_SOTAs/networks/vgg.py``).

Layout and parameter names of that file: 3x3 conv blocks ``layer11, layer12`` (64 channels),
``layer21, layer22`` (128), ``layer31..layer33`` (256), ``layer41..layer43`` (512), each ``.0`` a conv with
bias and ``.1`` its BatchNorm2d, then ReLU; a 2x2 max-pool after each of these four stages and a fifth
2x2 max-pool; then two hidden fully connected blocks ``layer6``, ``layer7`` (``.0`` Linear 512 -> 512,
``.1`` BatchNorm1d, then ReLU) and the classifier ``layer8`` (Linear 512 -> num_classes). The release
has four conv stages (ten convs, not the thirteen of Simonyan and Zisserman's VGG-16) plus three linear
layers; the name "VGG16" is the release's.

The release normalizes nothing inside the network (its ``normalize`` call is commented out; the training
script normalizes the input with CIFAR-10 statistics before the model): here that is rpat's ``normalize``
layer (``model.normalize=true``, or ``mean``/``std``), so the model still takes [0, 1] images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier
from .registry import register_model

#: (stage, number of 3x3 convs, output channels) of the release's VGG16.
VGG16_STAGES: tuple[tuple[int, int, int], ...] = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv3x3 (with bias) - BatchNorm2d - ReLU: ``(B, c_in, H, W)`` -> ``(B, c_out, H, W)``."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def _fc_block(d_in: int, d_out: int) -> nn.Sequential:
    """Linear - BatchNorm1d - ReLU: ``(B, d_in)`` -> ``(B, d_out)``."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())


class VGG16(ImageClassifier):
    """The release's VGG16: conv stages of 64, 128, 256, 512 channels, each followed by a 2x2 max-pool,
    a fifth max-pool, then ``layer6`` / ``layer7`` (512 -> 512) and ``layer8`` (the logits).

    Input ``(B, in_chans, H, W)`` in [0, 1]; at 32x32 the fifth pool sees 2x2 and leaves 1x1 (it is
    a global max-pool here, so other sizes divisible by 16 work too). ``forward`` returns
    ``(B, num_classes)``. Proxies: ``second_to_last`` is the output of ``layer7`` ``(B, 512)``, the
    embedding fed to ``layer8``; ``third_to_last`` is the output of ``layer6`` ``(B, 512)``, the
    layer under it (VGG's last three layers are fully connected, so this proxy is 2-D).
    PyTorch's default initialization, as in the release.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, mean, std)
        c_in = in_chans
        self._convs: list[str] = []
        for stage, n, c_out in VGG16_STAGES:
            for i in range(1, n + 1):
                name = f"layer{stage}{i}"
                self.add_module(name, _conv_block(c_in, c_out))
                self._convs.append(name)
                c_in = c_out
        self.layer6 = _fc_block(512, 512)
        self.layer7 = _fc_block(512, 512)
        self.layer8 = nn.Linear(512, num_classes)
        self.embed_dim = 512
        self._stage_ends = {f"layer{stage}{n}" for stage, n, _ in VGG16_STAGES}

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized ``(B, C, H, W)`` -> ``(layer6 output (B, 512), layer7 output (B, 512))``."""
        out = x
        for name in self._convs:
            out = getattr(self, name)(out)
            if name in self._stage_ends:
                out = F.max_pool2d(out, 2, 2)
        out = torch.flatten(F.adaptive_max_pool2d(out, 1), 1)  # the release's fifth 2x2 max-pool at 32x32
        third = self.layer6(out)
        return third, self.layer7(third)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` -> ``(B, num_classes)``."""
        return self.layer8(features)


@register_model("vgg16", aliases=("vgg-16", "vgg16_bn", "vgg16bn"))
def vgg16(
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> VGG16:
    """The RPAT release's VGG16 (BatchNorm, ten 3x3 convs, three linear layers); 8,173,130 parameters for 10 classes."""
    return VGG16(num_classes, in_chans, mean, std)
