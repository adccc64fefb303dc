"""The dataset types and registry: ArrayDataset, DatasetSpec, DATASETS, and the evaluation order.

Every loader (:func:`rpat.data.load.load_dataset`) returns an :class:`ArrayDataset`: ``images``
uint8 ``(N, C, H, W)`` with pixel values 0..255, ``labels`` int64 ``(N,)`` and the class names.
``DATASETS`` maps each supported name to its :class:`DatasetSpec` (the formats are described in
:mod:`rpat.data.formats`, loading, caching and downloads in :mod:`rpat.data.load`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "CLASS_SORTED_TEST",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "PARTIAL_DECODE",
    "SPLITS",
    "ArrayDataset",
    "DatasetSpec",
    "evaluation_indices",
    "evaluation_subset",
    "get_spec",
    "spec_for",
]

SPLITS = ("train", "test")
#: file name endings (lower case) that the image-folder loader reads; others are skipped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ---------------------------------------------------------------------------------------
# containers


@dataclass
class ArrayDataset:
    """A labelled image set held in memory.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, pixel values 0..255 (CPU for loaded sets).
        labels: int64 tensor ``(N,)``, class indices into ``classes``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise ValueError("ArrayDataset.images must be a 4-D (N, C, H, W) tensor")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"ArrayDataset.images must be uint8, got {self.images.dtype}")
        labels = torch.as_tensor(self.labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
            raise ValueError("ArrayDataset.labels must be a 1-D integer tensor")
        self.labels = labels.long()
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"ArrayDataset has {len(self.images)} images but {len(self.labels)} labels"
            )
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ArrayDataset:
        """The examples at ``indices`` (ints, in the given order; repeats allowed).

        Returns a new dataset whose tensors are copies (advanced indexing).
        """
        if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool:
            raise ValueError("subset() takes integer indices, not a boolean mask")
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device).reshape(-1)
        return ArrayDataset(self.images[idx], self.labels[idx.to(self.labels.device)],
                            list(self.classes))


@dataclass(frozen=True)
class DatasetSpec:
    """What rpat knows about a dataset.

    Attributes:
        name: key in ``DATASETS``.
        num_classes: number of classes (0 for ``imagefolder``: see :func:`spec_for`).
        image_size: image height = width in pixels (0 for ``imagefolder``).
        in_chans: channels (3 RGB, 1 for digits).
        crop_padding: zero padding in pixels for the random-crop augmentation.
        flip: whether random horizontal flips are a valid augmentation.
        mean, std: per-channel statistics of the training set on the [0, 1] scale,
            for users who want a normalization layer (empty for ``imagefolder``).
        url: official download URL of the archive (None: nothing to download).
        filename: archive file name expected at ``<root>/<filename>``.
        md5, sha256: checksum of the archive (hex).
    """

    name: str
    num_classes: int
    image_size: int
    in_chans: int
    crop_padding: int = 4
    flip: bool = True
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    url: str | None = None
    filename: str | None = None
    md5: str | None = None
    sha256: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10", 10, 32, 3, 4, True,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, 32, 3, 4, True,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "tiny-imagenet": DatasetSpec(
        "tiny-imagenet", 200, 64, 3, 4, True,
        mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
        url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        filename="tiny-imagenet-200.zip", md5="90528d7ca1a48142e341f4ef8d21d0de",
    ),
    "imagefolder": DatasetSpec("imagefolder", 0, 0, 3, 4, True),
    # digits are not mirror-symmetric: no flips; 1 px of padding on 8x8 images
    "digits": DatasetSpec("digits", 10, 8, 1, 1, False, mean=(0.3053,), std=(0.3759,)),
}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered under ``name`` (InputError if unknown)."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}") from None


def spec_for(name: str, dataset: ArrayDataset) -> DatasetSpec:
    """``get_spec(name)`` with ``num_classes``, ``image_size``, ``in_chans`` read off the data.

    Needed for ``imagefolder``, whose registered spec has zeros there; for the
    other datasets the values read off the data equal the registered ones.
    ``image_size`` is the image height.
    """
    spec = get_spec(name)
    return dataclasses.replace(
        spec,
        num_classes=len(dataset.classes),
        image_size=int(dataset.images.shape[2]),
        in_chans=int(dataset.images.shape[1]),
    )


# ---------------------------------------------------------------------------------------
# evaluation order


#: datasets whose test split is stored grouped by class: "the first N test images" of them
#: would be a few classes only, so evaluation subsets are drawn by a fixed permutation instead.
CLASS_SORTED_TEST = frozenset({"imagefolder", "tiny-imagenet"})
#: datasets decoded image by image, so that asking for a subset decodes only it
PARTIAL_DECODE = frozenset({"imagefolder", "tiny-imagenet"})


def evaluation_indices(name: str, n_total: int, n: int) -> torch.Tensor:
    """Indices of the ``n`` test images every rpat evaluation of dataset ``name`` uses.

    For CIFAR-10/100 and digits these are the first ``n`` (the usual convention,
    e.g. RobustBench's); for class-sorted splits (``imagefolder``, ``tiny-imagenet``)
    the first ``n`` of a permutation fixed by seed 0, so that a subset is class-mixed
    and the same across runs, seeds and machines.
    """
    n = min(n, n_total)
    if name in CLASS_SORTED_TEST:
        g = torch.Generator().manual_seed(0)
        return torch.randperm(n_total, generator=g)[:n]
    return torch.arange(n)


def evaluation_subset(name: str, test: ArrayDataset, n: int) -> ArrayDataset:
    """The first ``n`` images of ``test`` in evaluation order (see :func:`evaluation_indices`)."""
    return test.subset(evaluation_indices(name, len(test), n))
