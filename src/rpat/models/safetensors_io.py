"""safetensors files: a state_dict plus a header of strings, written atomically and read back with clear errors.

safetensors (``pip install 'rpat[safetensors]'``) stores raw tensors and a JSON header of string values; a
file cannot run code when loaded, which makes it the format to share a model in. The package is imported
here and nowhere else, inside the functions, so rpat needs it only when a ``.safetensors`` file is written
or read. What rpat puts in the header (the model card) is :mod:`rpat.evaluation.export`'s business, and
turning such a file back into a checkpoint dict is :func:`rpat.checkpoint.load_checkpoint`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from ..utils import atomic_write

SUFFIX = ".safetensors"
#: The header's ``format`` of a file ``rpat export`` wrote; any other safetensors file loads as a plain state_dict.
HEADER_FORMAT = "rpat-model"
HEADER_VERSION = 1
#: Header key of the SHA-256 of the tensors (:func:`rpat.checkpoint.state_dict_sha256`, keys sorted by name).
DIGEST_HEADER = "model_sha256"
MISSING = "reading or writing .safetensors files needs the safetensors package: pip install 'rpat[safetensors]'"


def is_safetensors_path(path: str | Path) -> bool:
    """Whether ``path`` names a safetensors file (by its ``.safetensors`` suffix)."""
    return Path(path).suffix == SUFFIX


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (each copied to a contiguous CPU tensor, so shared storage is never an error) and the
    string header ``metadata`` to ``path`` atomically (:func:`rpat.utils.atomic_write`). InputError when the
    package is missing, a header value is not a string, or the file cannot be written."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise InputError(MISSING) from None
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise InputError(f"safetensors header values must be strings; {bad[0]!r} is not")
    data = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=dict(metadata))
    try:
        with atomic_write(path, "wb", fsync_dir=True) as f:
            f.write(data)
    except OSError as e:
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors on the CPU, header metadata)`` of a safetensors file (metadata ``{}`` when it has none).
    InputError when the file is missing, the package is not installed, or the file is not valid safetensors."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint {str(p)!r} not found")
    try:
        from safetensors import safe_open
    except ImportError:
        raise InputError(MISSING) from None
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        detail = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"cannot load {str(p)!r}: not a valid safetensors file ({detail})") from None
    return tensors, metadata


def checkpoint_fields(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      path: str | Path) -> dict | None:
    """The checkpoint fields of a file ``rpat export`` wrote: ``arch``, ``model_kwargs``, ``config``,
    ``epoch``, ``weights``, ``rpat_version``, ``model`` (the tensors, keys sorted by name), ``digest`` (the
    header's SHA-256, None if absent) and ``exported`` (the whole header). None for any other file (no
    ``format: rpat-model`` in its header). InputError for a newer format version or an incomplete header."""
    if metadata.get("format") != HEADER_FORMAT:
        return None
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > HEADER_VERSION:
        raise InputError(f"{str(path)!r} has rpat-model format version {version!r}, newer than this rpat reads "
                         f"({HEADER_VERSION}); upgrade rpat")
    try:
        fields = {"arch": metadata["arch"], "model_kwargs": json.loads(metadata["model_kwargs"]),
                  "config": json.loads(metadata["config"]), "epoch": int(metadata["epoch"]),
                  "weights": metadata.get("weights", "online"), "rpat_version": metadata.get("rpat_version")}
    except (KeyError, ValueError) as e:
        raise InputError(f"{str(path)!r}: its rpat-model header is incomplete or damaged ({type(e).__name__}: {e}); "
                         "export the checkpoint again with `rpat export`") from None
    return {**fields, "model": dict(sorted(tensors.items())), "digest": metadata.get(DIGEST_HEADER),
            "exported": dict(metadata)}
