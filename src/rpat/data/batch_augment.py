"""The batch augmentations after crop/flip: AutoAugment (+ Cutout) from a start epoch, and CutMix.

:class:`BatchAugment` is what :class:`rpat.data.loader.DeviceLoader` runs on each uint8 batch after
the random crop and flip and before the float conversion, with the epoch's augmentation generator:

1. from 0-based epoch ``autoaugment_start_epoch`` on (the release's ``autoaug_sche``, which switches
   its loader to the ``autoaug`` transform half-way through training), the CIFAR-10 AutoAugment policy
   (:mod:`rpat.data.autoaugment`) and then Cutout of side ``cutout`` (the release's ``autoaug`` ends
   with ``CutoutDefault(int(image_size / 2))``, 16 px on CIFAR; None: half the image side; 0: none);
2. CutMix (:mod:`rpat.data.cutmix`), every epoch: the labels become float ``(B, K)`` probabilities.

With everything off the batch is returned as it came, and nothing is drawn from the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .autoaugment import autoaugment, cutout
from .cutmix import cutmix

__all__ = ["BatchAugment"]


@dataclass(frozen=True)
class BatchAugment:
    """AutoAugment from ``autoaugment_start_epoch`` (with Cutout ``cutout`` px) and CutMix into ``num_classes``."""

    autoaugment: bool = False
    autoaugment_start_epoch: int = 0
    cutout: int | None = None  #: Cutout side in px (None: half the image side; 0: none)
    cutmix: bool = False
    num_classes: int | None = None  #: K of the soft labels (needed with cutmix)

    def __post_init__(self) -> None:
        if self.cutmix and (self.num_classes is None or self.num_classes < 1):
            raise InputError(f"CutMix needs the number of classes, got num_classes={self.num_classes!r}")
        for name in ("autoaugment_start_epoch", "cutout"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f"data.{'autoaugment_cutout' if name == 'cutout' else name} must be an "
                                 f"integer >= 0, got {v!r}")

    @classmethod
    def from_config(cls, data: Any, num_classes: int) -> BatchAugment | None:
        """The augmentation of a run's ``data`` config section (``Config.data``: ``autoaugment``,
        ``autoaugment_start_epoch``, ``autoaugment_cutout``, ``cutmix``); None when both are off."""
        if not (data.autoaugment or data.cutmix):
            return None
        return cls(bool(data.autoaugment), data.autoaugment_start_epoch, data.autoaugment_cutout,
                   bool(data.cutmix), int(num_classes))

    @property
    def soft_labels(self) -> bool:
        """Whether batches come with ``(B, K)`` probability labels (CutMix on)."""
        return self.cutmix

    def autoaugment_on(self, epoch: int) -> bool:
        """Whether AutoAugment (and its Cutout) runs at 0-based ``epoch``."""
        return self.autoaugment and epoch >= self.autoaugment_start_epoch

    def __call__(self, images_u8: Tensor, labels: Tensor, epoch: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """uint8 ``(B, C, H, W)`` images and labels ``(B,)`` (or ``(B, K)``) -> the augmented pair.

        Draws from ``generator`` (the loader's epoch generator) only what is on: AutoAugment, Cutout,
        then CutMix. No host sync.
        """
        if self.autoaugment_on(epoch):
            side = min(images_u8.shape[-2:]) // 2 if self.cutout is None else self.cutout
            images_u8 = cutout(autoaugment(images_u8, generator), side, generator)
        if self.cutmix:
            images_u8, labels = cutmix(images_u8, labels, int(self.num_classes), generator)
        return images_u8, labels
