"""Loading a dataset split: find (or download) its archive, decode it once, cache the arrays.

Caching: decoding a whole archive or folder takes seconds to minutes, so the
decoded arrays of cifar10, cifar100, tiny-imagenet and imagefolder are saved as
``<cache_dir>/<name>-<split>-<fingerprint>.npz`` (``cache_dir`` defaults to
``<root>/.rpat-cache``). The fingerprint covers the archive's name, size and
mtime, or for an image folder every file's relative path, size and mtime, so
changing the source invalidates the cache. Cache files are written atomically
(:func:`rpat.utils.atomic_write`: a temporary file beside, then ``os.replace``); older
caches of the same dataset and split are removed. An unreadable cache is ignored and rebuilt.

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

import hashlib
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..utils import atomic_write
from .datasets import PARTIAL_DECODE, SPLITS, ArrayDataset, DatasetSpec, get_spec
from .download import download_file, resolve_url
from .formats import (
    _decode_cifar,
    _decode_imagefolder,
    _decode_tiny,
    _load_digits,
    _scan_imagefolder,
    looks_like_imagefolder,
)

__all__ = ["count_images", "load_dataset"]

CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------
# entry points


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
            ``imagefolder``, the ``train/`` and ``test/`` trees (``"test"`` needs only
            ``test/``). Ignored for digits.
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
        classes, files, listing = _scan_imagefolder(root, split)
        fingerprint = _digest(listing)

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
        if looks_like_imagefolder(root):
            raise InputError(
                f"{spec.name} archive not found at {path}, but {root} holds an image folder "
                f"(train/<class>/<image> or test/<class>/<image>): to use it pass --dataset imagefolder"
            )
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
    try:
        with atomic_write(path, "wb") as f:
            np.savez(f, images=ds.images.numpy(), labels=ds.labels.numpy(),
                     classes=np.array(ds.classes, dtype=str))
    except OSError as e:
        warnings.warn(f"could not write the dataset cache {path} ({e}); decoding again next time",
                      RuntimeWarning, stacklevel=3)
        return
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(f"{prefix}*.npz"):
        if old != path and old.name[len(prefix):-4].isalnum():
            old.unlink(missing_ok=True)
