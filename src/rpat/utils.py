"""Small helpers: devices, seeds, run metadata, the one atomic file write."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from .errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; validates explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def derived_seed(seed: int, *parts: int) -> int:
    """A deterministic 63-bit seed from a base seed and integers (epoch, stream id...)."""
    h = seed & 0x7FFFFFFFFFFFFFFF
    for p in parts:
        h = (h * 1_000_003 + p + 0x9E3779B9) & 0x7FFFFFFFFFFFFFFF
    return h


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the rpat source tree (or None outside a git checkout)."""
    here = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def progress_enabled(requested: bool = True, stream: object | None = None) -> bool:
    """Whether to draw tqdm bars: only when asked for and the stream (stderr) is a terminal.

    Redirected logs get no bars; long phases then log one line with their result instead.
    """
    s = sys.stderr if stream is None else stream
    isatty = getattr(s, "isatty", None)
    return bool(requested) and callable(isatty) and bool(isatty())


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, tmp_suffix: str = ".tmp",
                 fsync_dir: bool = False) -> Iterator[IO[Any]]:
    """Write ``path`` atomically: yields a file open on a temporary file beside it (``.<name>.<random><suffix>``);
    on success it is flushed, fsynced and renamed over ``path`` (and, with ``fsync_dir``, the folder is fsynced).

    A kill at any moment leaves the previous file or the new one, never a truncated one; on any exception the
    temporary file is removed and the exception propagates (the caller words the error). The parent folder is
    created. The one atomic-write helper of rpat: checkpoints, AutoAttack state, dataset caches, downloads and
    reports all use it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=tmp_suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync_dir:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def file_identity(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a file (read in 1 MiB chunks): the same bytes give the same identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": Path(path).stat().st_size}
