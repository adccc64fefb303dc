"""Training batches made on the device: uint8 gather, crop/flip, then float.

The images stay uint8 (a quarter of the float32 size) until they are on the
device; augmentation runs there, vectorized over the batch; conversion to
float32 in [0, 1] comes last. Batch order and augmentation depend only on
``(seed, epoch)``, so a resumed run sees exactly the batches it would have
seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import InputError
from .batch_augment import BatchAugment
from .datasets import ArrayDataset

__all__ = ["DeviceLoader", "epoch_seed", "random_crop_flip", "shard_order"]

_MASK64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffle: ``seed * 1_000_003 + epoch`` (mod 2**64)."""
    return (int(seed) * 1_000_003 + int(epoch)) & _MASK64


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a second, unrelated 64-bit seed from ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def shard_order(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of an epoch's index order ``(N,)`` among ``world_size`` processes.

    Like ``torch.utils.data.DistributedSampler`` without ``drop_last``: the
    order is padded by wrapping around to a multiple of ``world_size``, and
    rank ``r`` takes positions ``r, r + W, r + 2W, ...``. Every rank gets
    ``ceil(N / W)`` indices; the shards are disjoint when ``W`` divides ``N``
    (otherwise the first ``pad`` indices appear twice). ``world_size = 1``
    returns ``order`` itself.
    """
    if world_size == 1:
        return order
    n = order.numel()
    total = -(-n // world_size) * world_size
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[rank:total:world_size]


def random_crop_flip(
    images_u8: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.

    Each image is zero-padded by ``padding`` pixels on every side and a window
    of the original size is cut at a uniformly random offset (``0..2*padding``
    in each direction); then, when ``flip`` is true, it is mirrored left-right
    with probability 0.5. Equivalent to torchvision's
    ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``.

    Args:
        images_u8: ``(B, C, H, W)`` tensor (any dtype; uint8 in rpat) on any device.
        padding: zero padding in pixels (>= 0); 0 means no crop.
        flip: whether to flip.
        generator: a ``torch.Generator`` on the same device as ``images_u8``;
            it is the only source of randomness.

    Returns:
        A new ``(B, C, H, W)`` tensor of the same dtype and device. No host sync.
    """
    if images_u8.ndim != 4:
        raise ValueError(
            f"random_crop_flip expects (B, C, H, W), got shape {tuple(images_u8.shape)}"
        )
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = images_u8.shape
    dev = images_u8.device
    p = int(padding)
    oy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)  # (B, 1)
    ox = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)  # (B, W)
    if flip:
        flipped = torch.randint(0, 2, (b, 1), generator=generator, device=dev).bool()
        cols = torch.where(flipped, (w - 1) - cols, cols)
    rows = torch.arange(h, device=dev).expand(b, h) + oy  # (B, H), rows in the padded image
    cols = cols + ox  # (B, W), columns in the padded image
    wp = w + 2 * p
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    padded = F.pad(images_u8, (p, p, p, p)) if p else images_u8
    out = padded.reshape(b, c, -1).gather(2, flat)
    return out.reshape(b, c, h, w)


class DeviceLoader:
    """Iterates ``(x, y)`` batches of an :class:`ArrayDataset` on a device.

    Yields ``x`` float32 ``(B, C, H, W)`` in [0, 1] and ``y`` int64 ``(B,)``, both
    on ``device``. With ``keep_on_device`` the whole uint8 image tensor is
    copied to the device once (CIFAR-10 train: 150 MB); otherwise each uint8
    batch is gathered on the host and copied with ``non_blocking`` (through
    pinned memory on CUDA).

    Order and augmentation come from generators seeded with
    :func:`epoch_seed` ``(seed, epoch)`` only, so ``set_epoch(e)`` followed by
    iteration always gives the same batches, whatever happened before. Call
    ``set_epoch`` before each epoch (it is not advanced automatically).

    Args:
        dataset: the images (uint8 ``(N, C, H, W)``) and labels.
        batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
        device: where batches are produced.
        shuffle: random order per epoch (else dataset order).
        augment: random crop (``padding`` px of zeros) and, if ``flip``, horizontal flips.
        padding, flip: see :func:`random_crop_flip`.
        drop_last: drop the final incomplete batch.
        seed: base seed.
        keep_on_device: hold the whole dataset on the device.
        rank, world_size: under data parallelism, this process's rank and the number
            of processes: each epoch's permutation (the same on every rank) is split
            by :func:`shard_order`, so ranks see different images; ``batch_size``
            is per rank. Rank 0 of 1 (the default) is the single-process loader.
        views: independently augmented views per image (1, or 2 for Consistency-AT).
            With ``V > 1`` each batch is ``x = cat([view_1, ..., view_V])``
            ``(V·B, C, H, W)`` and ``y = cat([y] * V)``: the views are cut from the
            same uint8 batch, one after another from the epoch's augmentation
            generator, so they differ and depend only on ``(seed, epoch)``.
            ``V = 1`` gives exactly the single-view batches.
        batch_augment: AutoAugment (from its start epoch) and CutMix after crop/flip, before the float
            conversion (:class:`rpat.data.batch_augment.BatchAugment`); with CutMix ``y`` is float ``(B, K)``.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        device: str | torch.device = "cpu",
        *,
        shuffle: bool = True,
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        keep_on_device: bool = True,
        views: int = 1,
        rank: int = 0,
        world_size: int = 1,
        batch_augment: BatchAugment | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        if int(padding) < 0:
            raise InputError(f"crop padding must be >= 0, got {padding}")
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise InputError(f"views must be an integer >= 1, got {views!r}")
        self.views = views
        if not 0 <= int(rank) < int(world_size):
            raise InputError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment
        self.padding = int(padding)
        self.flip = flip
        self.drop_last = drop_last
        self.seed = int(seed)
        self.keep_on_device = keep_on_device
        self.batch_augment = batch_augment
        self.epoch = 0
        if keep_on_device:
            self._images = dataset.images.to(self.device)
            self._labels = dataset.labels.to(self.device)
        else:
            self._images = dataset.images.cpu()
            self._labels = dataset.labels.cpu()
        self._pin = not keep_on_device and self.device.type == "cuda"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = -(-len(self.dataset) // self.world_size)  # this rank's share (all of it with one process)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(CPU generator for the order, device generator for augmentation) of this epoch."""
        s = epoch_seed(self.seed, self.epoch)
        order = torch.Generator()
        order.manual_seed(s)
        aug = torch.Generator(device=self.device)
        aug.manual_seed(_mix64(s) if self.rank == 0 else _mix64(_mix64(s) + self.rank))
        return order, aug

    def indices(self) -> torch.Tensor:
        """This rank's dataset indices ``(ceil(N / world_size),)`` for the current epoch, in batch order (CPU)."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=self._generators()[0]) if self.shuffle else torch.arange(n)
        return shard_order(order, self.rank, self.world_size)  # same permutation on every rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        aug_gen = self.augmentation_generator()
        for xb, yb in self.uint8_batches():
            yield self.finish_batch(xb, yb, aug_gen)

    def augmentation_generator(self) -> torch.Generator:
        """This epoch's device generator for augmentation (fresh, seeded by ``(seed, epoch, rank)``)."""
        return self._generators()[1]

    def uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches before augmentation: uint8 ``(B, C, H, W)`` and int64 ``(B,)`` on the device."""
        order = self.indices()
        if self.keep_on_device:
            order = order.to(self.device)  # one copy per epoch; batches are slices of it
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self._images.index_select(0, idx)
            yb = self._labels.index_select(0, idx)
            if not self.keep_on_device:
                if self._pin:
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                xb = xb.to(self.device, non_blocking=True)
                yb = yb.to(self.device, non_blocking=True)
            yield xb, yb

    def finish_batch(self, xb: torch.Tensor, yb: torch.Tensor,
                     aug_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The one augmentation path: a uint8 batch ``(B, C, H, W)`` on the device -> the training batch.

        Views, crop/flip (drawn from ``aug_gen``, the epoch's generator, advanced in place) and the
        float conversion to [0, 1]. Every batch the trainer sees goes through here, also the mixed
        real + extra batches of :class:`rpat.data.mixed.MixedLoader`.
        """
        do_aug = self.augment and (self.padding > 0 or self.flip)
        if self.views > 1:
            if do_aug:
                xb = torch.cat([random_crop_flip(xb, self.padding, self.flip, aug_gen)
                                for _ in range(self.views)])
            else:
                xb = xb.repeat(self.views, 1, 1, 1)
            yb = yb.repeat(self.views)
        elif do_aug:
            xb = random_crop_flip(xb, self.padding, self.flip, aug_gen)
        if self.batch_augment is not None:  # AutoAugment, CutMix (rpat.data.batch_augment)
            xb, yb = self.batch_augment(xb, yb, self.epoch, aug_gen)
        return xb.float().div_(255), yb
