"""The decoders, each format to a uint8 ArrayDataset: CIFAR tarballs, Tiny-ImageNet zip, image folders, digits.

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
    classes are the sorted sub-folder names of ``train`` (of ``test`` when only
    ``test/`` is there: evaluating needs no training images), images are sorted by
    file name and decoded to RGB; all must share one size. Its spec in
    ``DATASETS`` has ``num_classes=0`` and ``image_size=0`` because those come
    from the data: call :func:`rpat.data.datasets.spec_for` with the loaded dataset
    to get a filled-in spec.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel,
    classes ``"0"``..``"9"``), needs ``pip install 'rpat[digits]'``. ``root``
    is ignored. The split is fixed: stratified, a third of each class (rounded)
    in ``"test"``, chosen with ``numpy.random.default_rng(0)``; both splits keep
    the original order.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InputError
from .datasets import IMAGE_EXTENSIONS, ArrayDataset

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


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def looks_like_imagefolder(root: Path) -> bool:
    """Whether ``root`` holds ``train/<class>/<image>`` or ``test/<class>/<image>`` (one image suffices)."""
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls in _class_folders(split_dir):
            with os.scandir(split_dir / cls) as it:
                if any(e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") for e in it):
                    return True
    return False


def _scan_imagefolder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]], str]:
    """Classes, (file, label) pairs in load order, and a fingerprint of the split's files.

    The classes are the sub-folders of ``train/``, which ``split`` must match; without
    ``train/`` (a folder holding only ``test/``, enough for ``rpat eval``) they are
    ``split``'s own. The fingerprint is a sha256 hex digest of the class names and every
    file's relative path, size and mtime (:mod:`rpat.data.load` turns it into the cache key).
    """
    train_dir = root / "train"
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"image folder {root} has no {split}/ folder; expected "
                         f"{split_dir}/<class>/<image>")
    # the classes (and so the labels) are train/'s; a test split alone (e.g. for rpat eval) uses its own
    class_dir = train_dir if train_dir.is_dir() else split_dir
    classes = _class_folders(class_dir)
    if not classes:
        raise InputError(f"{class_dir} has no class folders; expected {class_dir}/<class>/<image>")
    if class_dir != split_dir:
        other = _class_folders(split_dir)
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
    return classes, files, h.hexdigest()


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
