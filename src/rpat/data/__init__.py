"""Datasets as uint8 tensors, checked downloads, and on-device training batches.

``load_dataset(name, root, split)`` returns an :class:`ArrayDataset` (uint8
``(N, C, H, W)`` images, int64 labels, class names), decoded once and cached
under ``<root>/.rpat-cache``; ``DeviceLoader`` turns it into float32 batches in
[0, 1] on the device, with random crop/flip done there. ``DATASETS`` maps names
to :class:`DatasetSpec`; ``spec_for(name, dataset)`` fills in what an image
folder's spec takes from the data. :mod:`.corruptions` reads the common-corruption sets (CIFAR-10-C,
CIFAR-100-C, Tiny-ImageNet-C: ``corruption_split``) and downloads them (``download_corruption_set``).
"""

from .corruptions import (
    CORRUPTION_SETS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    CorruptionSet,
    check_corruption_folder,
    corruption_folder,
    corruption_set,
    corruption_split,
    download_corruption_set,
    list_corruptions,
)
from .datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    PARTIAL_DECODE,
    SPLITS,
    ArrayDataset,
    DatasetSpec,
    evaluation_indices,
    evaluation_subset,
    get_spec,
    spec_for,
)
from .download import MIRROR_ENV, download_file, file_digest, resolve_url
from .load import count_images, load_dataset
from .loader import DeviceLoader, epoch_seed, random_crop_flip

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_SETS",
    "DATASETS",
    "EXTRA_CORRUPTIONS",
    "IMAGE_EXTENSIONS",
    "MIRROR_ENV",
    "PARTIAL_DECODE",
    "SEVERITIES",
    "SPLITS",
    "ArrayDataset",
    "CorruptionSet",
    "DatasetSpec",
    "DeviceLoader",
    "check_corruption_folder",
    "corruption_folder",
    "corruption_set",
    "corruption_split",
    "count_images",
    "download_corruption_set",
    "download_file",
    "epoch_seed",
    "evaluation_indices",
    "evaluation_subset",
    "file_digest",
    "get_spec",
    "list_corruptions",
    "load_dataset",
    "random_crop_flip",
    "resolve_url",
    "spec_for",
]
