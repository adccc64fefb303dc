"""Shared fixtures: a small, fixed subset of the real CIFAR-10 JPEGs."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

CIFAR10_JPEG_ENV = "RPAT_CIFAR10_JPEG"
SUBSET_SIZES = {"train": 40, "test": 20}  # images per class, the first by sorted file name


def cifar10_jpeg_archive() -> Path:
    """Where the real CIFAR-10 JPEG archive is.

    ``$RPAT_CIFAR10_JPEG`` if set, else ``../shared/datasets`` next to the checkout,
    else the project machines' ``/work/shared/datasets`` (for clones made elsewhere).
    """
    env = os.environ.get(CIFAR10_JPEG_ENV)
    if env:
        return Path(env).expanduser()
    name = "shared/datasets/cifar10-jpeg.tar.gz"
    candidates = [Path(__file__).resolve().parents[1].parent / name, Path("/work") / name]
    return next((c for c in candidates if c.is_file()), candidates[0])


@pytest.fixture(scope="session")
def cifar10_jpeg_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of an image-folder tree with real CIFAR-10 JPEGs (32x32 RGB).

    Layout ``train/<class>/NNNN.jpg`` (the first 40 files of each class by
    sorted name, 400 in all) and ``test/<class>/NNNN.jpg`` (first 20 per class,
    200 in all), extracted once per session into a temporary folder. Skips when
    the archive is absent. Treat the folder as read-only (copy it to modify it).
    """
    archive = cifar10_jpeg_archive()
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 JPEG archive not found at {archive} "
                    f"(set {CIFAR10_JPEG_ENV} to the path of cifar10-jpeg.tar.gz)")
    root = tmp_path_factory.mktemp("cifar10-jpeg-subset")
    with tarfile.open(archive, "r:gz") as tf:
        groups: dict[tuple[str, str], list[tuple[str, tarfile.TarInfo]]] = {}
        for m in tf.getmembers():
            parts = m.name.removeprefix("./").split("/")
            if (m.isfile() and len(parts) == 3 and parts[0] in SUBSET_SIZES
                    and parts[1] not in ("", ".", "..") and parts[2].lower().endswith(".jpg")):
                groups.setdefault((parts[0], parts[1]), []).append((parts[2], m))
        chosen: list[tuple[Path, tarfile.TarInfo]] = []
        for (split, cls), items in groups.items():
            items.sort(key=lambda it: it[0])
            chosen += [(root / split / cls / name, m) for name, m in items[: SUBSET_SIZES[split]]]
        chosen.sort(key=lambda it: it[1].offset_data)  # read in archive order: one forward pass
        for dest, m in chosen:
            f = tf.extractfile(m)
            assert f is not None
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read())
    return root
