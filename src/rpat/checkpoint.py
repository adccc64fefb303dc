"""Checkpoints: atomic writes, ``weights_only`` loads, and model reconstruction.

An rpat checkpoint is a plain dict of tensors and primitives, so it loads with
``torch.load(path, weights_only=True)``:

    {"format": "rpat-checkpoint", "format_version": 1, "rpat_version": "...",
     "arch": "resnet18", "model_kwargs": {"num_classes": 10, "in_chans": 3, "mean": None, "std": None},
     "model": state_dict, "epoch": <completed epochs>, "config": {...}, ...training state...}

Plain state_dicts of the supported architectures (e.g. public checkpoints)
load too, given the architecture; a DDP ``module.`` prefix is stripped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .utils import atomic_write

FORMAT = "rpat-checkpoint"
FORMAT_VERSION = 1
SLOW_SAVE_ENV = "RPAT_TEST_SLOW_SAVE"


def _test_slow_save() -> None:
    """Test hook: ``RPAT_TEST_SLOW_SAVE=<seconds>`` sleeps between writing the temporary file and
    the rename, widening the window in which ``tools/crash_harness.py`` kills a checkpoint write."""
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        try:
            time.sleep(max(0.0, float(delay)))
        except ValueError:
            pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`rpat.utils.atomic_write` (temporary file, fsync, rename, folder fsync).

    A kill at any moment leaves either the previous file or the new one, never a
    truncated file. Errors (disk full, unwritable folder) raise InputError and
    leave the previous file intact.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb", fsync_dir=True) as f:
            torch.save(obj, f)
            _test_slow_save()
    except OSError as e:
        raise InputError(
            f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors; returns the dict."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint {str(p)!r} not found")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load checkpoint {str(p)!r}: {msg}") from None
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint {str(p)!r} holds a {type(obj).__name__}, not a state_dict")
    if obj.get("format") == FORMAT:
        v = obj.get("format_version")
        if not isinstance(v, int) or v > FORMAT_VERSION:
            raise InputError(
                f"checkpoint {str(p)!r} has format version {v}, newer than this rpat reads "
                f"({FORMAT_VERSION}); upgrade rpat"
            )
    return obj


def is_rpat_checkpoint(obj: dict[str, Any]) -> bool:
    return obj.get("format") == FORMAT


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of an rpat checkpoint or a plain/wrapped state_dict."""
    if is_rpat_checkpoint(obj):
        return obj["model"]
    for key in ("model", "state_dict", "model_state_dict", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError("the checkpoint holds no model weights (no tensors found)")
    return tensors


def model_from_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    map_location: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model a checkpoint holds and load its weights (strictly).

    For an rpat checkpoint, architecture and sizes come from its metadata
    (``arch`` may override it only with the same name). For a plain state_dict,
    ``arch`` is required and ``num_classes`` defaults to 10.
    Returns ``(model in eval mode, checkpoint dict)``.
    """
    from .models import create_model, load_weights

    obj = load_checkpoint(path, map_location)
    if is_rpat_checkpoint(obj):
        kwargs = dict(obj["model_kwargs"])
        ck_arch = obj["arch"]
        if arch is not None and arch != ck_arch:
            raise InputError(f"checkpoint {str(path)!r} holds a {ck_arch}, not a {arch}")
        arch = ck_arch
    else:
        if arch is None:
            raise InputError(
                f"{str(path)!r} is a plain state_dict: name its architecture with --arch"
            )
        kwargs = {"num_classes": num_classes or 10, "in_chans": in_chans}
    model = create_model(arch, **kwargs)
    load_weights(model, extract_state_dict(obj), arch=arch)
    model.eval()
    return model, obj
