"""Batches that mix the real training set with an extra (generated) set: a fixed share of rows per batch.

``data.extra_fraction = f`` with per-rank batch size ``B``: every batch holds ``k = round(f·B)`` extra
rows after ``B − k`` real rows. **An epoch is as many batches as the real set needs** at batch size ``B``:
``ceil(N_real / B)`` per rank, the published recipes' definition (DM-Improves-AT's
``core/data/semisup.py``, from Rebuffi et al.'s PyTorch code: ``num_batches = ceil(dataset_size /
batch_size)`` with ``dataset_size`` the real training set; so an epoch is ``N_real`` images, real and
extra together, and 400 epochs cost what 400 plain epochs cost). The real rows of epoch ``e`` are drawn as
in a normal epoch: the first ``ceil(N_real / B)·(B − k)`` positions of the real set's permutation of that
epoch (:class:`rpat.data.loader.DeviceLoader` with batch size ``B − k``), so each epoch sees a fresh
random ``1 − f`` share of the real images once.

The extra rows (:class:`ExtraSampler`) walk one pseudo-random permutation of the extra set through the
whole run, reshuffled at each full pass: no row repeats within a pass, and the rows of ``(epoch, step)``
are a pure function of ``(seed, epoch, step)`` (and the run's fixed sizes), so a resumed run sees the
same batches. Under DDP the step's draw of ``k·W`` positions is split ``r::W`` among the ``W`` ranks:
disjoint shares. Both parts then go through the loader's one augmentation path
(:meth:`DeviceLoader.finish_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..utils import derived_seed
from .extra import ExtraSource
from .loader import DeviceLoader

__all__ = ["ExtraSampler", "MixedLoader", "extra_rows", "feistel_permute", "row_smoothing"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def extra_rows(fraction: float, batch_size: int) -> int:
    """Extra rows of a batch of ``batch_size``: ``round(fraction · batch_size)``; InputError unless it
    leaves at least one real and one extra row."""
    k = round(float(fraction) * int(batch_size))
    if not 1 <= k < batch_size:
        raise InputError(f"data.extra_fraction={fraction} of a batch of {batch_size} is {k} extra rows; it must "
                         f"give between 1 and {batch_size - 1} (raise data.batch_size or change the fraction)")
    return k


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit hash of the uint64 array ``x`` under ``key`` (SplitMix64 finalizer of ``x ^ key``)."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def feistel_permute(i: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A pseudo-random permutation of ``[0, n)`` applied to ``i`` ``(K,)``, without materializing it.

    A ``rounds``-round Feistel network on the smallest even number of bits covering ``n`` (a bijection
    of ``[0, 2^bits)``), with cycle walking (re-applied while the value is ``>= n``), so it is a
    bijection of ``[0, n)``. ``key`` picks the permutation. O(K) time and memory, whatever ``n``.
    """
    i = np.asarray(i, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(i, dtype=np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [int(derived_seed(key, r)) for r in range(rounds)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << half) | right

    out = once(i)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = once(out[todo])
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class ExtraSampler:
    """The extra rows of each step: ``indices(epoch, step, rank)`` ``(rows,)``, a pure function of its arguments.

    Global position ``P = (epoch·steps_per_epoch + step)·rows·W + rows_pos`` runs through the run; pass
    ``q = P // n`` uses permutation ``feistel_permute(·, n, derived_seed(seed, 47, q))`` of the ``n``
    extra rows, so each pass visits every row once, in a fresh order. Rank ``r`` of ``W`` takes the
    positions ``r, r + W, ...`` of the step's ``rows·W``: the ranks' rows are disjoint (except across a
    pass boundary, where two passes' orders meet).
    """

    def __init__(self, n: int, rows: int, steps_per_epoch: int, seed: int, world_size: int = 1):
        if n < 1 or rows < 1 or steps_per_epoch < 1 or world_size < 1:
            raise ValueError(f"ExtraSampler needs n, rows, steps_per_epoch, world_size >= 1, got "
                             f"{n}, {rows}, {steps_per_epoch}, {world_size}")
        self.n, self.rows, self.steps_per_epoch = int(n), int(rows), int(steps_per_epoch)
        self.seed, self.world_size = int(seed), int(world_size)

    def indices(self, epoch: int, step: int, rank: int = 0) -> np.ndarray:
        """Rank ``rank``'s extra rows of 0-based ``(epoch, step)``: int64 ``(rows,)`` in ``[0, n)``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        per_step = self.rows * self.world_size
        start = (int(epoch) * self.steps_per_epoch + int(step)) * per_step
        pos = start + rank + self.world_size * np.arange(self.rows, dtype=np.int64)
        passes, within = np.divmod(pos, self.n)
        out = np.empty(self.rows, dtype=np.int64)
        for q in np.unique(passes):
            sel = passes == q
            out[sel] = feistel_permute(within[sel], self.n, derived_seed(self.seed, 47, int(q)))
        return out


class MixedLoader:
    """Real + extra batches: wraps the run's :class:`DeviceLoader` ``real`` (built with the full batch size).

    Takes ``k = round(fraction · real.batch_size)`` rows of each batch from ``extra`` and lowers
    ``real.batch_size`` to the real share ``B − k``. ``len(self)`` stays the number of batches of ``B`` the
    real set needs (``ceil(N_real / B)`` per rank); the real rows are the real loader's first ``len(self)``
    batches of the epoch. The extra rows are gathered from the maps on the host (just those rows) and moved
    to the device (pinned, non-blocking on CUDA); ``cat([real rows, extra rows])`` (uint8) then goes with the
    labels through ``real.finish_batch`` (views, crop/flip, batch augmentation, float in [0, 1]) with the
    epoch's augmentation generator: ``x`` float32 ``(V·B, C, H, W)``, ``y`` int64 ``(V·B,)`` (float
    ``(V·B, K)`` with CutMix); the extra rows are the last ``k`` of each view. Per-row label smoothing for
    them: :meth:`smoothing`, :func:`row_smoothing`.
    """

    def __init__(self, real: DeviceLoader, extra: ExtraSource, fraction: float):
        c, h, w = (int(s) for s in real.dataset.images.shape[1:])
        if extra.image_shape != (h, w, c):
            raise InputError(f"data.extra: images are {'x'.join(map(str, extra.image_shape))} (H x W x C) but the "
                             f"training images are {h}x{w}x{c}; the extra set must have the real set's size")
        self.batch_size = int(real.batch_size)
        self.extra_rows = extra_rows(fraction, self.batch_size)
        self.real_rows = self.batch_size - self.extra_rows
        real.batch_size = self.real_rows
        self.real, self.extra, self.fraction = real, extra, float(fraction)
        self.device = real.device
        self.views = real.views
        n_rank = -(-len(real.dataset) // real.world_size)  # this rank's share of the real set
        self._len = n_rank // self.batch_size if real.drop_last else -(-n_rank // self.batch_size)
        if self._len < 1:
            raise InputError(f"the {n_rank} real images (per process) fill no batch of {self.batch_size}")
        self.sampler = ExtraSampler(len(extra), self.extra_rows, self._len, real.seed, real.world_size)
        self._pin = self.device.type == "cuda"

    @property
    def epoch(self) -> int:
        return self.real.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration produces."""
        self.real.set_epoch(epoch)

    def __len__(self) -> int:
        return self._len

    def describe(self) -> str:
        """One line for the log: the extra set, the rows per batch and the epoch length."""
        n_real = -(-len(self.real.dataset) // self.real.world_size)
        return (f"extra data: {self.extra.describe()}; {self.extra_rows} of {self.batch_size} rows per batch "
                f"({100 * self.extra_rows / self.batch_size:.1f}%) from it; an epoch is {len(self)} batches, as many "
                f"as the {n_real:,} real images need at batch {self.batch_size} (the published recipes' epoch), "
                f"with {min(len(self) * self.real_rows, n_real):,} real images per epoch")

    def smoothing(self, real: float, extra: float) -> Callable[[int], torch.Tensor]:
        """``rows -> (rows,)`` per-row label smoothing of a batch of ``rows`` rows: ``real`` on the real rows,
        ``extra`` on the extra rows (:func:`row_smoothing`); one cached device tensor per row count, so a
        captured step reuses it and nothing is read back to the host."""
        cache: dict[int, torch.Tensor] = {}

        def per_row(rows: int) -> torch.Tensor:
            if rows not in cache:
                cache[rows] = row_smoothing(rows, self.views, self.extra_rows, extra, real, self.device)
            return cache[rows]

        return per_row

    def extra_batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra rows of ``(epoch, step)`` for this rank: uint8 ``(k, C, H, W)``, int64 ``(k,)`` on the device."""
        idx = self.sampler.indices(epoch, step, self.real.rank)
        x, y = self.extra.gather(idx)  # NHWC uint8, host, just these rows
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return x, y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        real, epoch = self.real, self.real.epoch
        aug_gen = real.augmentation_generator()
        # the real loader has ceil(N / (B - k)) batches; the epoch takes its first ceil(N / B)
        for step, (xr, yr) in zip(range(self._len), real.uint8_batches(), strict=False):
            xe, ye = self.extra_batch(epoch, step)
            yield real.finish_batch(torch.cat([xr, xe]), torch.cat([yr, ye]), aug_gen)


def row_smoothing(n_rows: int, views: int, extra: int, smoothing: float, real: float = 0.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-row label smoothing of a mixed batch of ``n_rows = V·B`` rows: ``real`` for the real rows,
    ``smoothing`` for the last ``extra`` rows of each of the ``views`` views. float32 ``(n_rows,)`` on
    ``device``; built from shapes only (no host sync)."""
    per_view = n_rows // views
    one = torch.full((per_view,), float(real), device=device)
    one[per_view - extra:] = smoothing
    return one.repeat(views)
