"""The data a run trains and selects on: the train set, its validation split and subset, the held-out set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..data import PARTIAL_DECODE, ArrayDataset, count_images, evaluation_subset, get_spec, load_dataset
from ..data.extra import ExtraSource, check_extra, open_extra
from ..errors import InputError
from ..utils import derived_seed


@dataclass
class RunData:
    """The data a run trains and selects on (uint8 images, CPU)."""

    train: ArrayDataset
    held_out: ArrayDataset
    num_classes: int
    in_chans: int
    padding: int
    flip: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    selection: str = "test"  #: where held_out comes from: "test" or "validation" (carved from train)
    extra: ExtraSource | None = None  #: data.extra, memory-mapped and checked against train (None: no extra data)


def split_validation(train: ArrayDataset, n: int, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """``(rest, val)``: ``n`` images drawn by ``seed`` become the validation set, the rest (in their
    original order) stay for training; the two never share an image index."""
    rest, val = _validation_indices(len(train), n, seed)
    return train.subset(rest), train.subset(val)


def _validation_indices(n_total: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n >= n_total:
        raise InputError(f"data.val_size={n} leaves no training images (the training set has {n_total})")
    g = torch.Generator().manual_seed(derived_seed(seed, 29))
    perm = torch.randperm(n_total, generator=g)
    return perm[n:].sort().values, perm[:n].sort().values


def train_indices(cfg: Config, n_total: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions in the full training split of the images trained on and of the validation split
    (``data.val_size``; None without one), after ``data.train_subset``; both sorted."""
    d = cfg.data
    idx, val = torch.arange(n_total), None
    if d.val_size is not None:
        idx, val = _validation_indices(n_total, d.val_size, d.val_seed)
    if d.train_subset is not None and d.train_subset < len(idx):
        g = torch.Generator().manual_seed(derived_seed(0, 17))  # fixed subset, same for every seed
        idx = idx[torch.randperm(len(idx), generator=g)[: d.train_subset].sort().values]
    return idx, val


def prepare_data(cfg: Config, train: ArrayDataset | None = None, test: ArrayDataset | None = None,
                 progress: bool = True) -> RunData:
    """Load (or take) the train/test sets, carve the validation split (``data.val_size``), apply
    the fixed train subset, cut the held-out set (the validation split, else the first test images).

    With ``data.train_subset`` on a dataset stored one JPEG per image (image folders,
    Tiny-ImageNet), only the images used (subset + validation split) are decoded.
    """
    d = cfg.data
    spec = get_spec(d.dataset)
    extra = open_extra(d.extra) if d.extra is not None else None  # headers only, before the real data is read
    if train is None and d.train_subset is not None and d.dataset in PARTIAL_DECODE:
        n_total = count_images(d.dataset, d.root, "train", download=d.download)
        idx, val_idx = train_indices(cfg, n_total)
        used = idx if val_idx is None else torch.cat([idx, val_idx]).unique()  # sorted
        part = load_dataset(d.dataset, d.root, "train", download=d.download, progress=progress, indices=used)
        train = part.subset(torch.searchsorted(used, idx))
        val = None if val_idx is None else part.subset(torch.searchsorted(used, val_idx))
    else:
        if train is None:
            train = load_dataset(d.dataset, d.root, "train", download=d.download, progress=progress)
        idx, val_idx = train_indices(cfg, len(train))
        val = None if val_idx is None else train.subset(val_idx)
        train = train.subset(idx) if len(idx) < len(train) else train
    if test is None and val is None:
        test = load_dataset(d.dataset, d.root, "test", download=d.download, progress=progress)
    held_out = val if val is not None else evaluation_subset(d.dataset, test, cfg.eval.n_examples)
    mean = tuple(spec.mean) if cfg.model.normalize and spec.mean else None
    std = tuple(spec.std) if cfg.model.normalize and spec.std else None
    if extra is not None:
        check_extra(extra, num_classes=len(train.classes), image_size=tuple(train.images.shape[2:]),
                    in_chans=int(train.images.shape[1]))
    return RunData(train, held_out, len(train.classes), int(train.images.shape[1]),
                   spec.crop_padding, spec.flip, mean, std, "test" if val is None else "validation", extra=extra)


def extra_source(cfg: Config, data: RunData) -> ExtraSource:
    """The run's ``data.extra`` set: ``data.extra`` when :func:`prepare_data` opened it, else opened now (data
    handed to the trainer directly) and checked against ``data.train``."""
    if data.extra is not None:
        return data.extra
    extra = open_extra(cfg.data.extra)
    check_extra(extra, num_classes=data.num_classes, image_size=tuple(data.train.images.shape[2:]),
                in_chans=data.in_chans)
    return extra
