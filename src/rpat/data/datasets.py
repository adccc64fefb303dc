"""Datasets as in-memory uint8 tensors, decoded once and cached.

Every loader returns an :class:`ArrayDataset`: ``images`` uint8 ``(N, C, H, W)``
with pixel values 0..255, ``labels`` int64 ``(N,)`` and the class names.

Supported datasets (``DATASETS``):

``cifar10`` / ``cifar100``
    Read straight from the official python archives
    (``<root>/cifar-10-python.tar.gz``, ``<root>/cifar-100-python.tar.gz``);
    CIFAR-100 uses the 100 fine labels.
``tiny-imagenet``
    Read straight from the official ``<root>/tiny-imagenet-200.zip``; 200
    classes (sorted wnids), 64x64 RGB. The ``"test"`` split is the labelled
    validation set, grouped by class (then sorted by file name).
``imagefolder``
    ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``;
    classes are the sorted sub-folder names of ``train``, images are sorted by
    file name and decoded to RGB; all must share one size. Its spec in
    ``DATASETS`` has ``num_classes=0`` and ``image_size=0`` because those come
    from the data: call :func:`spec_for` with the loaded dataset to get a
    filled-in spec.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel,
    classes ``"0"``..``"9"``), needs ``pip install 'rpat[digits]'``. ``root``
    is ignored. The split is fixed: stratified, a third of each class (rounded)
    in ``"test"``, chosen with ``numpy.random.default_rng(0)``; both splits keep
    the original order.

Caching: decoding a whole archive or folder takes seconds to minutes, so the
decoded arrays of cifar10, cifar100, tiny-imagenet and imagefolder are saved as
``<cache_dir>/<name>-<split>-<fingerprint>.npz`` (``cache_dir`` defaults to
``<root>/.rpat-cache``). The fingerprint covers the archive's name, size and
mtime, or for an image folder every file's relative path, size and mtime, so
changing the source invalidates the cache. Cache files are written atomically
(temporary name, then ``os.replace``); older caches of the same dataset and
split are removed. An unreadable cache is ignored and rebuilt.

Partial decoding: ``load_dataset(..., indices=...)`` returns only those images. For
``imagefolder`` and ``tiny-imagenet`` (one JPEG per image) it decodes only them, unless
the whole split is already cached, and caches the subset as ``<name>-<split>_subset-<key>.npz``
(one such file per dataset and split); :func:`count_images` gives a split's size without
decoding. CIFAR and digits are read whole (their archives hold arrays, about a second),
then cut.

Downloads: ``load_dataset(..., download=True)`` fetches a missing archive from
the spec's ``url`` (directory replaced by ``$RPAT_MIRROR`` when set, see
:func:`rpat.data.download.resolve_url`) and verifies its checksum. Tests can
also pass ``spec=dataclasses.replace(get_spec(name), url=...)`` or monkeypatch
an entry of ``DATASETS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InputError
from .download import download_file, resolve_url

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ArrayDataset",
    "DatasetSpec",
    "count_images",
    "get_spec",
    "load_dataset",
    "spec_for",
]

SPLITS = ("train", "test")
#: file name endings (lower case) that the image-folder loader reads; others are skipped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
CACHE_VERSION = 1


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
# entry point


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


def load_dataset(
    name: str,
    root: str | Path,
    split: str,
    download: bool = False,
    cache_dir: str | Path | None = None,
    *,
    spec: DatasetSpec | None = None,
    progress: bool = True,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> ArrayDataset:
    """Load one split of a dataset as uint8 tensors.

    Args:
        name: a key of ``DATASETS`` (``cifar10``, ``cifar100``, ``tiny-imagenet``,
            ``imagefolder``, ``digits``).
        root: folder holding the archive (``<root>/<spec.filename>``) or, for
            ``imagefolder``, the ``train/`` and ``test/`` trees. Ignored for digits.
        split: ``"train"`` or ``"test"``.
        download: fetch the archive into ``root`` when it is missing (and verify
            an existing one's checksum). Ignored for imagefolder and digits.
        cache_dir: where decoded arrays are cached (default ``<root>/.rpat-cache``).
        spec: use this spec's ``url``/``filename``/checksums instead of the
            registered one (for tests and mirrors); the loader is chosen by ``name``.
        progress: show tqdm bars while downloading and decoding.
        indices: only these images of the split (positions in load order), in this order;
            for ``PARTIAL_DECODE`` datasets only they are decoded (see the module doc).

    Returns:
        :class:`ArrayDataset` with ``images`` uint8 ``(N, C, H, W)`` on the CPU.

    Raises:
        InputError: unknown name or split, missing/corrupt archive or image,
            inconsistent image folder, failed download.
    """
    registered = get_spec(name)
    spec = spec if spec is not None else registered
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if name == "digits":
        ds = _load_digits(split)
        return ds if idx is None else ds.subset(idx)

    root = Path(root).expanduser()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else root / ".rpat-cache"
    if name == "imagefolder":
        classes, files, fingerprint = _scan_imagefolder(root, split)

        def decode(sel: torch.Tensor | None) -> ArrayDataset:
            return _decode_imagefolder(files if sel is None else [files[i] for i in sel.tolist()], classes, progress)
    else:
        archive = _find_archive(spec, root, download, progress)
        st = archive.stat()
        fingerprint = _digest(f"{archive.name}\t{st.st_size}\t{st.st_mtime_ns}")

        def decode(sel: torch.Tensor | None) -> ArrayDataset:
            if name in ("cifar10", "cifar100"):
                return _decode_cifar(archive, name, split)
            return _decode_tiny(archive, split, progress, sel)
    cache = _cache_path(cache_root, name, split, fingerprint)
    ds = _read_cache(cache)
    if ds is None and idx is not None and name in PARTIAL_DECODE:  # decode only what is asked for
        key = _digest(f"{fingerprint}\n{idx.numpy().tobytes().hex()}")
        sub_cache = _cache_path(cache_root, name, f"{split}_subset", key)
        sub = _read_cache(sub_cache)
        if sub is None:
            sub = decode(idx)
            _write_cache(sub_cache, sub)
        return sub
    if ds is None:
        ds = decode(None)
        _write_cache(cache, ds)
    return ds if idx is None else ds.subset(idx)


def count_images(name: str, root: str | Path, split: str, download: bool = False,
                 spec: DatasetSpec | None = None) -> int:
    """How many images ``load_dataset(name, root, split)`` returns, without decoding any (fixed for CIFAR)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if name == "imagefolder":
        return len(_scan_imagefolder(Path(root).expanduser(), split)[1])
    if name == "tiny-imagenet":
        archive = _find_archive(spec or get_spec(name), Path(root).expanduser(), download, False)
        return len(_decode_tiny(archive, split, False, count_only=True))
    return len(load_dataset(name, root, split, download=download, spec=spec, progress=False))


def _find_archive(spec: DatasetSpec, root: Path, download: bool, progress: bool) -> Path:
    """``<root>/<spec.filename>``, downloaded first when asked to."""
    if not spec.filename:
        raise InputError(f"dataset {spec.name!r} has no archive file name in its spec")
    path = root / spec.filename
    if download:
        if not spec.url:
            raise InputError(f"dataset {spec.name!r} has no download URL; place {path} by hand")
        return download_file(resolve_url(spec.url), path, md5=spec.md5, sha256=spec.sha256,
                             progress=progress)
    if not path.is_file():
        where = f" from {resolve_url(spec.url)}" if spec.url else ""
        raise InputError(
            f"{spec.name} archive not found at {path}; pass --download to fetch it{where}, "
            f"or place {spec.filename} there"
        )
    return path


# ---------------------------------------------------------------------------------------
# cache


def _digest(text: str) -> str:
    return hashlib.sha256(f"rpat-cache-v{CACHE_VERSION}\n{text}".encode()).hexdigest()[:20]


def _cache_path(cache_root: Path, name: str, split: str, fingerprint: str) -> Path:
    return cache_root / f"{name}-{split}-{fingerprint}.npz"


def _read_cache(path: Path) -> ArrayDataset | None:
    """The cached dataset at ``path``, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], z["classes"]
        if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
            return None
        return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                            [str(c) for c in classes.tolist()])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None


def _write_cache(path: Path, ds: ArrayDataset) -> None:
    """Save ``ds`` to ``path`` atomically; warn (don't fail) if the folder is not writable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=ds.images.numpy(), labels=ds.labels.numpy(),
                     classes=np.array(ds.classes, dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the dataset cache {path} ({e}); decoding again next time",
                      RuntimeWarning, stacklevel=3)
        return
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(f"{prefix}*.npz"):
        if old != path and old.name[len(prefix):-4].isalnum():
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# image decoding


def _decode_image(source: bytes | Path, where: str) -> np.ndarray:
    """Decode one image to an RGB uint8 array ``(H, W, 3)``; InputError naming ``where``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {where} ({e}); delete or replace that file") from None


# ---------------------------------------------------------------------------------------
# CIFAR


_CIFAR = {
    # name: (folder in the archive, train members, test members, meta member,
    #        label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                 "fine_label_names"),
}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches that only rebuilds numpy arrays (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict[str, object]:
    """A CIFAR batch dict with str keys (the official files have bytes keys)."""
    try:
        obj = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure here means a corrupt member
        raise InputError(f"cannot unpickle {where} ({e}); the archive is corrupt: delete it and "
                         f"re-run with --download") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where} is not a CIFAR batch (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_tar_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Bytes of the ``wanted`` members (names without a leading ``./``), in one pass."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if name in wanted and m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        found[name] = f.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise InputError(
            f"{path} is not a readable tar archive ({e}); delete it and re-run with --download, "
            f"or replace it with a good copy"
        ) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise InputError(f"{path} lacks {missing[0]}: is it the official archive? Delete it and "
                         f"re-run with --download")
    return found


def _decode_cifar(path: Path, name: str, split: str) -> ArrayDataset:
    """Decode CIFAR-10/100 ``split`` from the official python tarball at ``path``."""
    folder, train, test, meta, label_key, names_key = _CIFAR[name]
    members = [f"{folder}/{m}" for m in (train if split == "train" else test)]
    meta_member = f"{folder}/{meta}"
    raw = _read_tar_members(path, {*members, meta_member})

    meta_dict = _unpickle(raw[meta_member], f"{path}:{meta_member}")
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta_dict[names_key]]
    except KeyError:
        raise InputError(f"{path}:{meta_member} has no {names_key!r}: not an official "
                         f"{name} archive") from None
    images, labels = [], []
    for member in members:
        batch = _unpickle(raw[member], f"{path}:{member}")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            lab = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{path}:{member} is not a {name} batch ({e!r})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (data.shape[0],):
            raise InputError(f"{path}:{member} has data of shape {data.shape} and "
                             f"{lab.size} labels; expected (N, 3072) and N")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes, each row-major
        labels.append(lab)
    lab_all = np.concatenate(labels)
    if lab_all.size and (lab_all.min() < 0 or lab_all.max() >= len(classes)):
        raise InputError(f"{path} has labels outside 0..{len(classes) - 1}")
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
                        torch.from_numpy(lab_all), classes)


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet


def _decode_tiny(path: Path, split: str, progress: bool, sel: torch.Tensor | None = None, *,
                 count_only: bool = False):
    """Decode Tiny-ImageNet-200 ``split`` from the official zip (``test`` = labelled val set).

    ``sel``: decode only these positions of the split; ``count_only``: return the split's
    (label, file, member) list without decoding anything.
    """
    bad = (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError)
    advice = "delete it and re-run with --download, or replace it with a good copy"
    try:
        zf = zipfile.ZipFile(path)
    except bad as e:
        raise InputError(f"{path} is not a readable zip archive ({e}); {advice}") from None
    with zf:
        names = zf.namelist()
        wnid_files = sorted((n for n in names if n.rsplit("/", 1)[-1] == "wnids.txt"),
                            key=lambda n: n.count("/"))
        if not wnid_files:
            raise InputError(f"{path} has no wnids.txt: is it tiny-imagenet-200.zip? {advice}")
        prefix = wnid_files[0][: -len("wnids.txt")]
        try:
            wnids = sorted({w.strip() for w in zf.read(wnid_files[0]).decode().split() if w})
            classes = wnids
            index = {w: i for i, w in enumerate(wnids)}
            items: list[tuple[int, str, str]] = []  # (label, file name, member)
            if split == "train":
                for n in names:
                    parts = n[len(prefix):].split("/")
                    if (n.startswith(prefix) and len(parts) == 4 and parts[0] == "train"
                            and parts[2] == "images" and parts[3].lower().endswith(".jpeg")):
                        if parts[1] not in index:
                            raise InputError(f"{path}: {n} is in a class missing from wnids.txt")
                        items.append((index[parts[1]], parts[3], n))
            else:
                ann = f"{prefix}val/val_annotations.txt"
                for line in zf.read(ann).decode().splitlines():
                    fields = line.strip().split("\t")
                    if len(fields) < 2:
                        continue
                    fname, wnid = fields[0], fields[1]
                    if wnid not in index:
                        raise InputError(f"{path}:{ann} names class {wnid!r} missing from "
                                         f"wnids.txt")
                    items.append((index[wnid], fname, f"{prefix}val/images/{fname}"))
            if not items:
                raise InputError(f"{path} holds no {split} images; {advice}")
            items.sort()
            if count_only:
                return items
            if sel is not None:
                items = [items[i] for i in sel.tolist()]
            images = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
            for i, (_, _, member) in enumerate(tqdm(items, desc=f"tiny-imagenet {split}",
                                                    disable=not progress, leave=False)):
                arr = _decode_image(zf.read(member), f"{path}:{member}")
                if arr.shape != (64, 64, 3):
                    raise InputError(f"{path}:{member} is {arr.shape[1]}x{arr.shape[0]}, "
                                     f"expected 64x64")
                images[i] = arr.transpose(2, 0, 1)
        except bad as e:
            raise InputError(f"cannot read {path} ({e!r}); {advice}") from None
    labels = np.array([it[0] for it in items], dtype=np.int64)
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


# ---------------------------------------------------------------------------------------
# image folder


def _scan_imagefolder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]], str]:
    """Classes, (file, label) pairs in load order, and a fingerprint of the split's files."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise InputError(f"image folder {root} has no train/ folder; expected "
                         f"{root}/train/<class>/<image> and {root}/test/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(train_dir)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InputError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    split_dir = root / split
    if split != "train":
        if not split_dir.is_dir():
            raise InputError(f"image folder {root} has no {split}/ folder; expected "
                             f"{split_dir}/<class>/<image>")
        other = sorted(e.name for e in os.scandir(split_dir)
                       if e.is_dir() and not e.name.startswith("."))
        if other != classes:
            only_train = sorted(set(classes) - set(other))
            only_split = sorted(set(other) - set(classes))
            raise InputError(
                f"{split_dir} and {train_dir} must hold the same class folders; only in train: "
                f"{', '.join(only_train) or '-'}; only in {split}: {', '.join(only_split) or '-'}"
            )
    files: list[tuple[Path, int]] = []
    h = hashlib.sha256("\n".join(classes).encode())
    for label, cls in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / cls)
             if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
             and e.is_file()),
            key=lambda e: e.name,
        )
        for e in entries:
            st = e.stat()
            h.update(f"\n{cls}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}".encode())
            files.append((Path(e.path), label))
    if not files:
        raise InputError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, files, _digest(h.hexdigest())


def _decode_imagefolder(files: list[tuple[Path, int]], classes: list[str],
                        progress: bool) -> ArrayDataset:
    """Decode ``files`` to RGB; every image must have the size of the first one."""
    images = None
    for i in tqdm(range(len(files)), desc="decoding images", disable=not progress, leave=False):
        path = files[i][0]
        arr = _decode_image(path, str(path))
        if images is None:  # the first image sets the size
            h, w = arr.shape[:2]
            images = np.empty((len(files), 3, h, w), dtype=np.uint8)
        elif arr.shape[:2] != (h, w):
            raise InputError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but {files[0][0]} is {w}x{h}; all "
                f"images of an image folder must share one size (resize them first)"
            )
        images[i] = arr.transpose(2, 0, 1)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    return ArrayDataset(torch.from_numpy(images), labels, list(classes))


# ---------------------------------------------------------------------------------------
# digits


def _load_digits(split: str) -> ArrayDataset:
    """scikit-learn's 8x8 digits, 0..16 scaled to 0..255; fixed stratified 2/3 : 1/3 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(
            "the digits dataset needs scikit-learn: pip install 'rpat[digits]'"
        ) from None
    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    target = np.asarray(d.target, dtype=np.int64)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(target), dtype=bool)
    for k in range(10):
        idx = np.flatnonzero(target == k)
        n_test = int(round(len(idx) / 3))
        test_mask[rng.permutation(idx)[:n_test]] = True
    keep = test_mask if split == "test" else ~test_mask
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images[keep][:, None])),
                        torch.from_numpy(target[keep]), [str(k) for k in range(10)])
