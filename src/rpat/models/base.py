"""The base class every rpat model derives from.

Conventions (all models):
- ``forward(x)`` takes images ``(B, C, H, W)`` as floats in [0, 1]; any
  normalization is the ``normalize`` layer inside the model, so training
  attacks, PGD-20 and AutoAttack all attack the same function.
- ``forward_proxies(x)`` returns, from one forward pass, the three
  perception proxies of the paper's Table 5:

  ``logits``          ``(B, num_classes)``
  ``second_to_last``  ``(B, D)``  the embedding fed to the classifier
                      (the pooled output of the last stage)
  ``third_to_last``   ``(B, C', H', W')`` the output of the stage before
                      the last one (the layer under the penultimate one)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InputError

PROXIES: tuple[str, ...] = ("logits", "second_to_last", "third_to_last")


def make_stage(
    block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """One ResNet stage: ``blocks`` residual blocks ``block(in, out, stride)``.

    The first block maps ``in_planes`` -> ``planes`` channels with ``stride``
    (``(B, in_planes, H, W)`` -> ``(B, planes, H / stride, W / stride)``); the
    rest keep ``planes`` channels at stride 1. Blocks are built in order, so
    parameter initialization under a fixed seed does not depend on this helper.
    """
    return nn.Sequential(*(block(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                           for i in range(blocks)))


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; identity when ``mean`` is None.

    The statistics are non-persistent buffers: they do not appear in the
    state_dict, so public checkpoints (trained without normalization layers)
    load with ``strict=True``. Our checkpoints record them in their metadata.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.enabled = mean is not None
        if not self.enabled:
            if std is not None:
                raise InputError("normalization got a std but no mean")
            return
        mean_l = [float(m) for m in mean]
        std_l = [float(s) for s in std] if std is not None else []
        if len(std_l) != len(mean_l) or not mean_l:
            raise InputError("normalization needs a std of the same (non-zero) length as mean")
        if not all(s > 0 for s in std_l):
            raise InputError(f"normalization std must be positive, got {std_l}")
        self.stats = (tuple(mean_l), tuple(std_l))  #: plain floats, for repr and metadata
        self.register_buffer("mean", torch.tensor(mean_l).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_l).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={list(self.stats[0])}, std={list(self.stats[1])}"


class ImageClassifier(nn.Module):
    """Base for all models: subclasses implement ``forward_stages`` and ``forward_head``."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{arg} must be a positive integer, got {value!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.arch: str | None = None  #: the registry name, set by ``create_model``
        self.normalize = Normalize(mean, std)
        if self.normalize.enabled and self.normalize.mean.numel() != in_chans:
            raise InputError(
                f"normalization has {self.normalize.mean.numel()} channel(s) but the model has in_chans={in_chans}"
            )

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From a normalized input, return ``(third_to_last, second_to_last)``."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Classifier: ``(B, D)`` embedding -> ``(B, num_classes)`` logits."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [0, 1] -> ``(B, D)`` second-to-last embedding."""
        return self.forward_stages(self.normalize(x))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_proxies(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All three perception proxies from one forward pass (see module doc)."""
        third, second = self.forward_stages(self.normalize(x))
        return {"logits": self.forward_head(second), "second_to_last": second, "third_to_last": third}

    def forward_proxy(self, x: torch.Tensor, proxy: str = "logits") -> torch.Tensor:
        """One perception proxy; ``logits`` costs exactly one ordinary forward."""
        if proxy == "logits":
            return self(x)
        if proxy not in PROXIES:
            raise InputError(f"unknown proxy {proxy!r}; valid: {', '.join(PROXIES)}")
        return self.forward_proxies(x)[proxy]
