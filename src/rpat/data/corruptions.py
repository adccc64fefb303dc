"""Common-corruption test sets (Hendrycks & Dietterich, ICLR 2019) in their official layouts.

``CIFAR-10-C`` / ``CIFAR-100-C``
    A folder with ``<corruption>.npy``, each ``(5 * n, 32, 32, 3)`` uint8 (HWC): 5 severities of the
    ``n`` test images (``n`` = 10,000 in the release), rows ``0..n-1`` severity 1, ..., ``4n..5n-1``
    severity 5, and ``labels.npy`` (``5 * n`` ints, one per row). Read memory-mapped
    (``np.load(mmap_mode="r")``): only the rows asked for are read.
``Tiny-ImageNet-C``
    ``<corruption>/<severity 1-5>/<class wnid>/*.JPEG`` (64x64 RGB); the classes are the sorted wnids,
    as in :mod:`rpat.data.formats` (Tiny-ImageNet's class order), images are sorted by class then file name.

``CORRUPTION_SETS`` holds what rpat knows about each set (folder, archive, URL, MD5);
:func:`corruption_split` reads one corruption at one severity as an :class:`ArrayDataset`
(uint8 ``(N, 3, H, W)``), :func:`check_corruption_folder` checks a folder before a long evaluation,
:func:`list_corruptions` names the corruptions a folder holds, :func:`download_corruption_set` fetches,
checks (MD5) and safely extracts a release into ``<root>/<folder>``. ``root`` may be the set's folder
itself or the folder holding it (``<root>/CIFAR-10-C``).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .datasets import IMAGE_EXTENSIONS, ArrayDataset, evaluation_indices, get_spec
from .download import download_file, resolve_url
from .formats import _decode_image

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_SETS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "CorruptionSet",
    "check_corruption_folder",
    "corruption_folder",
    "corruption_set",
    "corruption_split",
    "download_corruption_set",
    "list_corruptions",
]

#: The 15 benchmark corruptions, in the paper's order (noise, blur, weather, digital).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out corruptions of the release, read only when asked for.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class CorruptionSet:
    """One corruption benchmark.

    Attributes:
        name: the name ``rpat download`` takes (``cifar10-c``).
        dataset: the clean dataset it corrupts (a key of ``rpat.data.DATASETS``), whose classes it uses.
        folder: the folder name of the release (``CIFAR-10-C``), expected at ``<root>/<folder>``.
        layout: ``"npy"`` (CIFAR-C) or ``"jpeg"`` (Tiny-ImageNet-C).
        image_size: image height = width in pixels.
        images_per_severity: test images per severity in the release (the reader accepts fewer).
        url, filename, md5: the official archive (a tar holding ``<folder>/``); ``md5`` None: rpat
            does not download it (no checksum it could verify).
    """

    name: str
    dataset: str
    folder: str
    layout: str
    image_size: int
    images_per_severity: int
    url: str | None = None
    filename: str | None = None
    md5: str | None = None


CORRUPTION_SETS: dict[str, CorruptionSet] = {
    "cifar10-c": CorruptionSet(
        "cifar10-c", "cifar10", "CIFAR-10-C", "npy", 32, 10_000,
        url="https://zenodo.org/records/2535967/files/CIFAR-10-C.tar",
        filename="CIFAR-10-C.tar", md5="56bf5dcef84df0e2308c6dcbcbbd8499"),
    "cifar100-c": CorruptionSet(
        "cifar100-c", "cifar100", "CIFAR-100-C", "npy", 32, 10_000,
        url="https://zenodo.org/records/3555552/files/CIFAR-100-C.tar",
        filename="CIFAR-100-C.tar", md5="11f0ed0f1191edbf9fa23466ae6021d3"),
    "tiny-imagenet-c": CorruptionSet(
        "tiny-imagenet-c", "tiny-imagenet", "Tiny-ImageNet-C", "jpeg", 64, 10_000,
        url="https://zenodo.org/records/2536630/files/Tiny-ImageNet-C.tar", filename="Tiny-ImageNet-C.tar"),
}


def corruption_set(dataset: str) -> CorruptionSet:
    """The :class:`CorruptionSet` of ``dataset``: a clean dataset's name (``cifar10``) or the set's (``cifar10-c``)."""
    for s in CORRUPTION_SETS.values():
        if dataset in (s.name, s.dataset):
            return s
    valid = ", ".join(f"{s.dataset} ({s.name})" for s in CORRUPTION_SETS.values())
    raise InputError(f"no common-corruption set for dataset {dataset!r}; valid: {valid}")


def _how_to_get(s: CorruptionSet, root: Path) -> str:
    if s.md5:
        return f"get it with `rpat download {s.name} --root {root}`"
    return f"download {s.filename} from {s.url} and extract it into {root}"


def corruption_folder(root: str | Path, dataset: str) -> Path:
    """The set's folder: ``<root>/<folder>`` (``data/CIFAR-10-C``) when that exists, else ``root`` itself."""
    s = corruption_set(dataset)
    root = Path(root).expanduser()
    return root / s.folder if (root / s.folder).is_dir() else root


def _names(corruptions: Sequence[str] | None) -> list[str]:
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    known = (*CORRUPTIONS, *EXTRA_CORRUPTIONS)
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        raise InputError(f"unknown corruption {', '.join(map(repr, unknown)) or '(none given)'}; valid: "
                         f"{', '.join(CORRUPTIONS)} and the extras {', '.join(EXTRA_CORRUPTIONS)}")
    return names


def _of(missing: list[str], names: list[str], corruptions: Sequence[str] | None, kind: str) -> str:
    """'3 of the 15 corruption files (fog.npy, ...)'."""
    which = "the 15" if corruptions is None else f"the {len(names)} asked-for"
    return f"{len(missing)} of {which} corruption {kind} ({', '.join(missing)})"


# ---------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C (.npy)


def _open_npy(path: Path) -> np.ndarray:
    """``path`` memory-mapped (nothing read but the header); InputError naming it if unreadable."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read {path} ({e}); delete it and get the set again") from None


def _check_npy(folder: Path, s: CorruptionSet, names: list[str]) -> int:
    """Check the shapes of ``labels.npy`` and each ``<name>.npy``; returns the images per severity."""
    labels = _open_npy(folder / "labels.npy")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] == 0 or labels.shape[0] % 5:
        raise InputError(f"{folder / 'labels.npy'} has shape {labels.shape} {labels.dtype}, expected "
                         f"({5 * s.images_per_severity},) int: one label per image of 5 severities")
    n_rows = int(labels.shape[0])
    want = (n_rows, s.image_size, s.image_size, 3)
    for name in names:
        path = folder / f"{name}.npy"
        arr = _open_npy(path)
        if arr.dtype != np.uint8 or arr.shape != want:
            raise InputError(
                f"{path} has shape {'x'.join(map(str, arr.shape))} {arr.dtype}, expected "
                f"{'x'.join(map(str, want))} uint8 (5 severities x {n_rows // 5} images, as many rows as "
                f"labels.npy; {5 * s.images_per_severity} in the release)")
    return n_rows // 5


def _npy_split(folder: Path, s: CorruptionSet, corruption: str, severity: int,
               n_examples: int | None) -> ArrayDataset:
    labels_all = _open_npy(folder / "labels.npy")
    per = int(labels_all.shape[0]) // 5
    n = per if n_examples is None else min(n_examples, per)
    start = (severity - 1) * per
    images = _open_npy(folder / f"{corruption}.npy")[start:start + n]  # reads only these rows
    labels = np.array(labels_all[start:start + n], dtype=np.int64)  # a copy, not the map
    n_classes = get_spec(s.dataset).num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"{folder / 'labels.npy'} has labels outside 0..{n_classes - 1} (rows {start}.."
                         f"{start + n - 1}): not a {s.folder} label file")
    # class names: the clean archive holds CIFAR's names, the set only indices
    return ArrayDataset(torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C")),
                        torch.from_numpy(labels), [str(k) for k in range(n_classes)])


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet-C (JPEG tree)


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_jpeg(folder: Path, names: list[str]) -> None:
    """Every ``<name>/<severity>/`` exists and all severities of a corruption hold the same classes."""
    for name in names:
        missing = [f"{sev}/" for sev in SEVERITIES if not (folder / name / str(sev)).is_dir()]
        if missing:
            raise InputError(f"{folder / name} lacks the severity folders {', '.join(missing)}: expected "
                             f"{folder / name}/<severity 1-5>/<class wnid>/*.JPEG")
        first = _subfolders(folder / name / "1")
        if not first:
            raise InputError(f"{folder / name / '1'} holds no class folders: expected <class wnid>/*.JPEG")
        for sev in SEVERITIES[1:]:
            other = _subfolders(folder / name / str(sev))
            if other != first:
                diff = sorted(set(first) ^ set(other))
                raise InputError(f"{folder / name / str(sev)} and {folder / name / '1'} hold different class "
                                 f"folders ({', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); every "
                                 f"severity needs the same classes (labels are the sorted wnids)")


def _jpeg_split(folder: Path, s: CorruptionSet, corruption: str, severity: int,
                n_examples: int | None) -> ArrayDataset:
    split_dir = folder / corruption / str(severity)
    classes = _subfolders(split_dir)
    items: list[tuple[int, str]] = []  # (label, path), by class then file name
    for label, wnid in enumerate(classes):
        files = sorted(e.name for e in os.scandir(split_dir / wnid)
                       if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))
        items += [(label, str(split_dir / wnid / f)) for f in files]
    if not items:
        raise InputError(f"{split_dir} holds no images: expected <class wnid>/*.JPEG")
    if n_examples is not None:  # class-sorted: a fixed class-mixed subset, as for Tiny-ImageNet's test split
        items = [items[i] for i in evaluation_indices(s.dataset, len(items), n_examples).tolist()]
    images = np.empty((len(items), 3, s.image_size, s.image_size), dtype=np.uint8)
    for i, (_, path) in enumerate(items):
        arr = _decode_image(Path(path), path)
        if arr.shape != (s.image_size, s.image_size, 3):
            raise InputError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected {s.image_size}x{s.image_size}")
        images[i] = arr.transpose(2, 0, 1)
    labels = torch.tensor([lab for lab, _ in items], dtype=torch.int64)
    return ArrayDataset(torch.from_numpy(images), labels, classes)


# ---------------------------------------------------------------------------------------
# entry points


def check_corruption_folder(root: str | Path, dataset: str, corruptions: Sequence[str] | None = None) -> Path:
    """Check that the set's folder holds ``corruptions`` (default the 15) in the official layout; returns the folder.

    One :class:`InputError` lists everything missing (``labels.npy`` and the corruption files or folders) and
    says how to get the set; a wrong shape or label count is one line naming the file, the shape found and
    the one expected. Only file headers are read.
    """
    s = corruption_set(dataset)
    names = _names(corruptions)
    root = Path(root).expanduser()
    folder = corruption_folder(root, dataset)
    where = "" if folder.is_dir() else " (it does not exist)"
    if folder.is_dir() and folder.name != s.folder and not list_corruptions(folder, s.name):
        where = f" (nor a {s.folder}/ folder in it)"
    get = _how_to_get(s, folder.parent if folder.name == s.folder else folder)
    if s.layout == "npy":
        expected = (f"expected labels.npy ({5 * s.images_per_severity} int) and <corruption>.npy "
                    f"({5 * s.images_per_severity}x{s.image_size}x{s.image_size}x3 uint8: 5 severities x "
                    f"{s.images_per_severity} images) for each of {', '.join(names)}")
        missing = [f"{c}.npy" for c in names if not (folder / f"{c}.npy").is_file()]
        no_labels = not (folder / "labels.npy").is_file()
        if missing or no_labels:
            parts = (["labels.npy"] if no_labels else []) + ([_of(missing, names, corruptions, "files")]
                                                              if missing else [])
            raise InputError(f"{s.folder} folder {folder}{where} lacks {' and '.join(parts)}: {expected}; {get}")
        _check_npy(folder, s, names)
    else:
        missing = [f"{c}/" for c in names if not (folder / c).is_dir()]
        if missing:
            raise InputError(
                f"{s.folder} folder {folder}{where} lacks {_of(missing, names, corruptions, 'folders')}: expected "
                f"<corruption>/<severity 1-5>/<class wnid>/*.JPEG ({s.image_size}x{s.image_size} RGB) for each of "
                f"{', '.join(names)}; {get}")
        _check_jpeg(folder, names)
    return folder


def corruption_split(root: str | Path, dataset: str, corruption: str, severity: int,
                     n_examples: int | None = None) -> ArrayDataset:
    """One corruption at one severity as an :class:`ArrayDataset` (uint8 ``(N, 3, H, W)``, int64 labels).

    Args:
        root: the set's folder (``CIFAR-10-C``) or the folder holding it.
        dataset: ``cifar10``, ``cifar100``, ``tiny-imagenet`` (or ``cifar10-c`` ...).
        corruption: one of ``CORRUPTIONS`` or ``EXTRA_CORRUPTIONS``.
        severity: 1..5.
        n_examples: only this many images of that severity (all when None or more than there are): for
            CIFAR-C the first N (the first N clean test images, corrupted), for Tiny-ImageNet-C, stored
            grouped by class, the first N of rpat's fixed permutation (:func:`evaluation_indices`).

    CIFAR-C reads only the rows asked for (memory-mapped); Tiny-ImageNet-C decodes only the chosen JPEGs.
    CIFAR-C class names are the label indices (``"0"``..); Tiny-ImageNet-C's are the sorted wnids.
    """
    s = corruption_set(dataset)
    if severity not in SEVERITIES:
        raise InputError(f"severity must be one of 1..5, got {severity!r}")
    if n_examples is not None and n_examples < 1:
        raise InputError(f"n_examples must be >= 1, got {n_examples}")
    folder = check_corruption_folder(root, dataset, [corruption])
    split = _npy_split if s.layout == "npy" else _jpeg_split
    return split(folder, s, corruption, severity, n_examples)


def list_corruptions(root: str | Path, dataset: str) -> list[str]:
    """The corruptions the set's folder holds: the benchmark ones in ``CORRUPTIONS`` order, then the extras.

    Only names rpat knows are listed; InputError when the folder does not exist.
    """
    s = corruption_set(dataset)
    folder = corruption_folder(root, dataset)
    if not folder.is_dir():
        raise InputError(f"no {s.folder} folder at {folder}; {_how_to_get(s, folder)}")
    if s.layout == "npy":
        present = {p.stem for p in folder.glob("*.npy") if p.is_file()}
    else:
        present = {p.name for p in folder.iterdir() if p.is_dir()}
    return [c for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS) if c in present]


# ---------------------------------------------------------------------------------------
# download


def download_corruption_set(name: str, root: str | Path, *, progress: bool = True,
                            keep_archive: bool = False) -> Path:
    """Fetch the set's tar, verify its MD5 and extract it into ``<root>/<folder>``; returns that folder.

    Nothing is fetched when ``<root>/<folder>`` already holds the 15 corruptions. The archive is downloaded
    with :func:`rpat.data.download.download_file` (atomic, checked; ``$RPAT_MIRROR`` honoured through
    :func:`resolve_url`) to ``<root>/<filename>``, extracted with ``tarfile``'s ``"data"`` filter (no paths
    outside the folder, no links out, no devices) into a temporary folder beside, checked with
    :func:`check_corruption_folder`, then moved into place (an existing partial folder gets the archive's
    files, same names replaced). The archive is deleted afterwards unless ``keep_archive``.
    """
    s = corruption_set(name)
    root = Path(root).expanduser()
    dest = root / s.folder
    if not s.md5 or not s.url or not s.filename:
        raise InputError(f"rpat cannot download {s.name} (no checksum to verify it against); "
                         f"{_how_to_get(s, root)}")
    if dest.is_dir():
        try:
            return check_corruption_folder(dest, s.name)
        except InputError:
            pass  # partial: fetch the archive and fill it in
    archive = download_file(resolve_url(s.url), root / s.filename, md5=s.md5, progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{s.folder}.", suffix=".extract", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                tf.extractall(tmp, filter="data")
        except tarfile.FilterError as e:
            raise InputError(f"{archive} holds an unsafe member ({e}); not extracted: delete it") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"cannot extract {archive} ({e}); delete it and re-run `rpat download "
                             f"{s.name}`") from None
        src = tmp / s.folder if (tmp / s.folder).is_dir() else tmp
        try:
            check_corruption_folder(src, s.name)
        except InputError as e:
            raise InputError(f"{archive} does not hold the {s.folder} release ({e}); delete it and "
                             f"re-run `rpat download {s.name}`") from None
        if not dest.exists():
            src.rename(dest)
        else:
            for entry in src.iterdir():
                target = dest / entry.name
                if entry.is_dir() and target.is_dir():
                    shutil.rmtree(target)
                entry.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return check_corruption_folder(dest, s.name)
