"""Checkpoints: atomic writes, ``weights_only`` loads, and model reconstruction.

An rpat checkpoint is a plain dict of tensors and primitives, so it loads with
``torch.load(path, weights_only=True)``:

    {"format": "rpat-checkpoint", "format_version": 1, "rpat_version": "...",
     "arch": "resnet18", "model_kwargs": {"num_classes": 10, "in_chans": 3, "mean": None, "std": None},
     "model": state_dict, "epoch": <completed epochs>, "config": {...}, ...training state...}

Plain state_dicts of the supported architectures (e.g. public checkpoints)
load too; a DDP ``module.`` prefix is stripped, and without ``arch`` the
architecture is inferred from the keys and shapes when exactly one model fits
(:func:`rpat.models.infer_arch`).

Integrity: :func:`atomic_save` adds to every rpat checkpoint a SHA-256 digest of
its model tensors (``model_sha256``: names, dtypes, shapes and raw bytes of
``obj["model"]`` in key order) and one of every other tensor in it
(``state_sha256``: optimizer, averaged weights, RNG states), and
:func:`load_checkpoint` checks them, so flipped bytes inside the tensor data
(which ``torch.load`` does not notice) are an error, not wrong numbers.
Checkpoints written before the digests, and plain state_dicts, load unverified
(:func:`model_from_checkpoint` says so once per file).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .models import create_model, infer_arch, load_weights
from .models.safetensors_io import checkpoint_fields, is_safetensors_path, read_safetensors
from .utils import atomic_write

FORMAT = "rpat-checkpoint"
FORMAT_VERSION = 1
SLOW_SAVE_ENV = "RPAT_TEST_SLOW_SAVE"
#: Checkpoint keys holding the SHA-256 digests of the model tensors and of every other tensor.
MODEL_DIGEST_KEY = "model_sha256"
STATE_DIGEST_KEY = "state_sha256"
_DIGEST_KEYS = (MODEL_DIGEST_KEY, STATE_DIGEST_KEY)
#: Files already reported as unverified in this process (resolved paths): one notice per file.
_UNVERIFIED_NOTED: set[str] = set()

Notice = Callable[[str], None]


def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the tensor's raw bytes (logical order, on the CPU) to ``h``."""
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0{data.nbytes}\n".encode())
    h.update(data)


def _hash_tree(h: Any, name: str, obj: Any) -> None:
    """Every tensor inside nested dicts/lists/tuples, in order, named by its path."""
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, name, obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _hash_tree(h, f"{name}.{k}" if name else str(k), v)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _hash_tree(h, f"{name}[{i}]", v)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over a state_dict's names, dtypes, shapes and raw bytes, in key order.

    Independent of device and memory layout (a channels-last tensor hashes like
    its contiguous copy), so a checkpoint saved from the GPU verifies on the CPU.
    """
    h = hashlib.sha256(b"rpat-tensors-v1\n")
    for name, t in state_dict.items():
        _hash_tree(h, str(name), t)
    return h.hexdigest()


def _state_sha256(obj: Mapping[str, Any]) -> str:
    """SHA-256 of every tensor of a checkpoint outside ``obj["model"]`` (optimizer, averaged weights, RNG)."""
    return state_dict_sha256({k: v for k, v in obj.items() if k != "model" and k not in _DIGEST_KEYS})


def _with_digests(obj: Any) -> Any:
    """An rpat checkpoint with a "model" state_dict gets its digests (a shallow copy); anything else as is."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("model"), Mapping):
        return {**obj, MODEL_DIGEST_KEY: state_dict_sha256(obj["model"]), STATE_DIGEST_KEY: _state_sha256(obj)}
    return obj


def _verify_digests(obj: dict[str, Any], p: Path) -> None:
    """InputError when a digest stored in an rpat checkpoint does not match its tensors."""
    damaged = (f"checkpoint {str(p)!r} is damaged: its {{what}} tensor data does not match the SHA-256 digest "
               "rpat stored when writing it; restore the file from a copy or use another checkpoint")
    stored = obj.get(MODEL_DIGEST_KEY)
    if stored is not None:
        model = obj.get("model")
        if not isinstance(model, Mapping) or state_dict_sha256(model) != stored:
            raise InputError(damaged.format(what="model"))
    stored = obj.get(STATE_DIGEST_KEY)
    if stored is not None and _state_sha256(obj) != stored:
        raise InputError(damaged.format(what="training-state (optimizer, averaged weights, RNG)"))


def _torch_error_detail(e: BaseException) -> str:
    """The cause in torch's load error, without its advice (which suggests ``weights_only=False``)."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    detail = " ".join((m.group(1) if m else text.splitlines()[0] if text else "").split())
    detail = re.split(r"(?<=[a-z0-9)])\. ", detail, maxsplit=1)[0].rstrip(".")  # its first sentence
    if not detail or "weights_only" in detail:
        detail = type(e).__name__
    elif detail.isdigit() or len(detail) < 8:
        detail = f"{type(e).__name__}: {detail}"
    return detail


def _load_error(p: Path, e: BaseException) -> InputError:
    """rpat's message for a file ``torch.load(weights_only=True)`` refused."""
    detail = "the file is empty" if p.stat().st_size == 0 else _torch_error_detail(e)
    g = re.match(r"Unsupported global: GLOBAL (\S+)", detail)
    if g:  # an intact file that pickles Python objects: not damaged, and rpat will not run its code
        return InputError(
            f"cannot load checkpoint {str(p)!r}: it holds a Python object ({g.group(1)}), not only tensors and "
            "plain values, and rpat does not unpickle objects; save the weights alone "
            "(torch.save(model.state_dict(), path)) and load that"
        )
    return InputError(f"cannot load checkpoint {str(p)!r}: the file is damaged or not a PyTorch checkpoint "
                      f"({detail})")


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
    leave the previous file intact. An rpat checkpoint (``format == FORMAT`` with a
    ``"model"`` state_dict) is written with the SHA-256 digests of its tensors
    (``model_sha256``, ``state_sha256``; the caller's dict is not changed), which
    :func:`load_checkpoint` verifies.
    """
    path = Path(path)
    obj = _with_digests(obj)
    try:
        with atomic_write(path, "wb", fsync_dir=True) as f:
            torch.save(obj, f)
            _test_slow_save()
    except OSError as e:
        raise InputError(
            f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors; returns the dict.

    An rpat checkpoint's tensor digests (see :func:`atomic_save`) are checked: a
    mismatch is an InputError saying the file is damaged. A file torch cannot read
    is an InputError saying it is damaged or not a checkpoint (with torch's reason,
    never its advice to load unsafely).
    """
    p = Path(path)
    if is_safetensors_path(p):
        return _load_safetensors(p)
    if not p.is_file():
        raise InputError(f"checkpoint {str(p)!r} not found")
    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol is not for the user
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise _load_error(p, e) from None
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint {str(p)!r} holds a {type(obj).__name__}, not a state_dict")
    if obj.get("format") == FORMAT:
        v = obj.get("format_version")
        if not isinstance(v, int) or v > FORMAT_VERSION:
            raise InputError(
                f"checkpoint {str(p)!r} has format version {v}, newer than this rpat reads "
                f"({FORMAT_VERSION}); upgrade rpat"
            )
        _verify_digests(obj, p)
    return obj


def _load_safetensors(p: Path) -> dict[str, Any]:
    """A ``.safetensors`` file as a checkpoint dict: one that ``rpat export`` wrote is an rpat checkpoint (arch,
    sizes and config from its header; its model digest checked), any other a plain state_dict."""
    tensors, metadata = read_safetensors(p)
    fields = checkpoint_fields(tensors, metadata, p)
    if fields is None:
        return tensors
    digest = fields.pop("digest")
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}
    if digest is not None:
        obj[MODEL_DIGEST_KEY] = digest
    _verify_digests(obj, p)
    return obj


def is_verified(obj: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint carried a digest of its model tensors (checked by :func:`load_checkpoint`)."""
    return is_rpat_checkpoint(obj) and obj.get(MODEL_DIGEST_KEY) is not None


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


def _notify(message: str, log: Notice | None, stacklevel: int) -> None:
    """``log(message)``, or a UserWarning pointing at the caller of :func:`model_from_checkpoint`."""
    if log is not None:
        log(message)
    else:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def _note_unverified(path: Path, obj: dict[str, Any], log: Notice | None) -> None:
    """Say once per file (per process) that its tensors carry no digest, so damage would go unnoticed."""
    if is_verified(obj):
        return
    key = str(path.resolve())
    if key in _UNVERIFIED_NOTED:
        return
    _UNVERIFIED_NOTED.add(key)
    what = ("an rpat checkpoint written before rpat stored tensor digests" if is_rpat_checkpoint(obj)
            else "a plain state_dict (no rpat digest)")
    _notify(f"{path}: unverified weights: {what}; damage inside its tensor data would go unnoticed", log, 3)


def plain_state_dict_arch(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                          num_classes: int | None = None, in_chans: int | None = None) -> str:
    """The one architecture a plain state_dict fits (:func:`rpat.models.infer_arch`), else InputError.

    The error asks for ``--arch``: it names the candidates when several fit, and
    says that none fits (for the given classes / channels) otherwise.
    """
    fits = infer_arch(state_dict, num_classes=num_classes, in_chans=in_chans)
    if len(fits) == 1:
        return fits[0]
    if fits:
        why = f"its weights fit several models ({', '.join(fits)})"
    else:
        sizes = [f"{v} {what}" for v, what in ((num_classes, "classes"), (in_chans, "input channel(s)"))
                 if v is not None]
        why = "its keys and shapes fit none of rpat's models" + (f" with {' and '.join(sizes)}" if sizes else "")
    raise InputError(f"{str(path)!r} is a plain state_dict and {why}: name its architecture with --arch "
                     "(see `rpat list models`)")


def model_from_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    map_location: str | torch.device = "cpu",
    log: Notice | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model a checkpoint holds and load its weights (strictly).

    For an rpat checkpoint, architecture and sizes come from its metadata
    (``arch`` may override it only with the same name). For a plain state_dict,
    ``num_classes`` defaults to 10, and without ``arch`` the architecture is the
    one model its keys and shapes fit (:func:`plain_state_dict_arch`; the line
    ``"<path>: architecture inferred from the weights: resnet18"`` says which).
    Weights without a digest (plain state_dicts, rpat checkpoints from before the
    digests) get one ``"<path>: unverified weights: ..."`` line per file and process.
    Those lines go to ``log`` when given, else to :func:`warnings.warn` (UserWarning).
    Returns ``(model in eval mode, checkpoint dict)``.
    """
    obj = load_checkpoint(path, map_location)
    if is_rpat_checkpoint(obj):
        kwargs = dict(obj["model_kwargs"])
        ck_arch = obj["arch"]
        if arch is not None and arch != ck_arch:
            raise InputError(f"checkpoint {str(path)!r} holds a {ck_arch}, not a {arch}")
        arch = ck_arch
    else:
        if arch is None:
            arch = plain_state_dict_arch(path, extract_state_dict(obj), num_classes=num_classes, in_chans=in_chans)
            _notify(f"{path}: architecture inferred from the weights: {arch}", log, 2)
        kwargs = {"num_classes": num_classes or 10, "in_chans": in_chans}
    _note_unverified(Path(path), obj, log)
    model = create_model(arch, **kwargs)
    load_weights(model, extract_state_dict(obj), arch=arch)
    model.eval()
    return model, obj
