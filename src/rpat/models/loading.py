"""Loading state_dicts (ours or public checkpoints) into rpat models, with clear errors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import InputError
from .base import ImageClassifier
from .registry import create_model, list_models, resolve_model_name

#: Wrapper segments added by DDP / DataParallel (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_SEGMENTS: tuple[str, ...] = ("module", "_orig_mod")
#: Key prefixes of public checkpoints that hold parameters the network never uses:
#: the TRADES/MART WideResNet defines a ``sub_block1`` that its forward skips.
UNUSED_PREFIXES: tuple[str, ...] = ("sub_block1.",)


def _strip_wrappers(key: str, model_keys: Mapping[str, object]) -> str:
    """Remove ``module.`` / ``_orig_mod.`` segments (and a ``Sequential``'s leading ``0.`` when the rest is a
    model key) unless the model itself uses the key as is."""
    if key in model_keys:
        return key
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_SEGMENTS:
        parts = parts[1:]
    parts = [p for p in parts[:-1] if p != "_orig_mod"] + parts[-1:]  # compiled submodules
    if len(parts) > 1 and parts[0] == "0" and ".".join(parts[1:]) in model_keys:
        parts = parts[1:]  # Sequential(network), as Rebuffi et al.'s and DM-Improves-AT's code save it (module.0.)
    return ".".join(parts)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ("," if t.dim() == 1 else "") + ")"


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head (the last ``nn.Linear`` producing the logits)."""
    num_classes = getattr(model, "num_classes", None)
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            last = name
    if last is None:
        return set()
    return {f"{last}.weight", f"{last}.bias"}


def _stem_key(model_sd: Mapping[str, torch.Tensor]) -> str | None:
    """Key of the first 4-D weight (the stem convolution), whose dim 1 is the number of input channels."""
    return next((k for k, v in model_sd.items() if k.endswith("weight") and v.dim() == 4), None)


def _architectures_with_keys(keys: set[str]) -> list[str]:
    """Registered models whose state_dict has exactly these keys (built on the meta device: no memory)."""
    fits = []
    with torch.device("meta"):
        for name in list_models():
            if set(create_model(name).state_dict()) == keys:
                fits.append(name)
    return fits


def _renamed(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` under the model's key names: wrapper prefixes stripped, unused public keys dropped,
    a missing BatchNorm ``num_batches_tracked`` filled with 0. InputError for a non-tensor entry or a
    key present twice."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"checkpoint entry {key!r} is not a named tensor; is this a state_dict?")
        new_key = _strip_wrappers(key, model_sd)
        if new_key.startswith(UNUSED_PREFIXES) and new_key not in model_sd:
            continue
        if new_key in cleaned:
            raise InputError(f"checkpoint holds {new_key!r} twice (with and without a wrapper prefix)")
        cleaned[new_key] = value
    for key, value in model_sd.items():
        if key.endswith(".num_batches_tracked") and key not in cleaned:
            prefix = key[: -len("num_batches_tracked")]
            if f"{prefix}running_mean" in cleaned:
                cleaned[key] = torch.zeros_like(value)
    return cleaned


def infer_arch(state_dict: Mapping[str, torch.Tensor], num_classes: int | None = None,
               in_chans: int | None = None) -> list[str]:
    """The registered models (canonical names, sorted) that ``state_dict`` fits exactly.

    A model fits when, after the renames :func:`load_weights` applies (wrapper
    prefixes, unused public keys, old BatchNorm keys), the state_dict has exactly
    its keys with exactly its shapes. ``num_classes`` / ``in_chans`` fix the size
    of the classifier head / the stem's input channels; ``None`` takes them from
    the weights (the head's rows, the first convolution's dim 1). Models are
    built on the meta device (no memory, no initialization cost). Not a state_dict
    (non-tensor entries, a key twice): ``[]``.

    Example: a CIFAR ResNet-18 state_dict (``conv1.weight`` ``(64, 3, 3, 3)`` ...
    ``linear.weight`` ``(10, 512)``) gives ``["resnet18"]``.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        return []
    fits = []
    with torch.device("meta"):
        for name in list_models():
            probe = create_model(name)
            probe_sd = probe.state_dict()
            try:
                cleaned = _renamed(state_dict, probe_sd)
            except InputError:
                return []  # not a state_dict at all: no model fits
            if set(cleaned) != set(probe_sd):
                continue
            head = sorted(k for k in _head_keys(probe) if k.endswith("weight"))
            stem = _stem_key(probe_sd)
            nc = num_classes if num_classes is not None else (cleaned[head[0]].shape[0] if head else 10)
            ic = in_chans if in_chans is not None else (cleaned[stem].shape[1] if stem and
                                                       cleaned[stem].dim() == 4 else 3)
            try:
                model_sd = create_model(name, num_classes=int(nc), in_chans=int(ic)).state_dict()
            except InputError:
                continue
            if all(cleaned[k].shape == v.shape for k, v in model_sd.items()):
                fits.append(name)
    return fits


def _display_name(model: nn.Module, arch: str | None) -> str:
    if arch is not None:
        try:
            return resolve_model_name(arch)
        except InputError:
            return str(arch)
    if isinstance(model, ImageClassifier) and model.arch:
        return model.arch
    return type(model).__name__


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str | None = None) -> None:
    """Load ``state_dict`` into ``model`` strictly, after checking every key and shape.

    - strips DDP/DataParallel ``module.`` and torch.compile ``_orig_mod.`` prefixes;
    - drops keys of public checkpoints that the architecture never uses (the
      TRADES WideResNet's ``sub_block1.*``);
    - fills a missing BatchNorm ``num_batches_tracked`` (checkpoints from old
      PyTorch versions lack it; it does not affect the function computed);
    - then compares keys and shapes with the model and raises
      :class:`~rpat.errors.InputError` naming the first mismatching key (in the
      model's order, else the first unexpected checkpoint key), before calling
      ``load_state_dict(strict=True)``.

    Args:
        model: the model to fill (its parameters keep their device and dtype); a
            DDP / DataParallel / torch.compile wrapper is looked through.
        state_dict: name -> tensor, e.g. ``torch.load(path, weights_only=True)``.
        arch: the architecture name to mention in errors (default: the model's).
    """
    if not isinstance(state_dict, Mapping):
        raise InputError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    while True:  # load into the network itself, not a DDP / DataParallel / torch.compile wrapper
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    name = _display_name(model, arch)
    model_sd = model.state_dict()
    cleaned = _renamed(state_dict, model_sd)
    missing = [k for k in model_sd if k not in cleaned]
    unexpected = [k for k in cleaned if k not in model_sd]
    reshaped = [k for k in model_sd if k in cleaned and cleaned[k].shape != model_sd[k].shape]
    if missing or unexpected or reshaped:
        first = next((k for k in model_sd if k in missing or k in reshaped), None)
        if first is None:
            detail = f"unexpected key {unexpected[0]!r}"
        elif first in missing:
            detail = f"missing key {first!r}"
        else:
            detail = (f"shape of {first!r} is {_shape(cleaned[first])} in the checkpoint "
                      f"but {_shape(model_sd[first])} in the model")
        counts = [f"{len(lst)} {what}" for lst, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                          (reshaped, "with another shape")) if lst]
        if len(missing) + len(unexpected) + len(reshaped) > 1:
            detail += f" (keys in all: {', '.join(counts)})"
        hint = "check --arch"
        fits = _architectures_with_keys(set(cleaned)) if missing or unexpected else []
        if fits:
            hint = f"its keys are those of {' / '.join(fits)}: check --arch"
        elif set(missing) == {"mean", "std"} and not unexpected and not reshaped:  # the dm_* models' statistics
            hint = ("the checkpoint lacks the input statistics the model keeps as buffers, as DM-Improves-AT's own "
                    "files do (RobustBench's copies have them): add 'mean' and 'std' (see docs/networks.md)")
        elif first in reshaped:
            ck, mine = cleaned[first].shape, model_sd[first].shape
            if not missing and not unexpected and set(reshaped) <= _head_keys(model):
                hint = f"the checkpoint is for {ck[0]} classes, the model for {mine[0]}: check --arch and the dataset"
            elif first == _stem_key(model_sd) and len(ck) == len(mine) == 4 and ck[0] == mine[0]:
                hint = (f"the checkpoint takes {ck[1]} input channel(s), the model {mine[1]}: "
                        f"check --arch and the dataset")
        raise InputError(f"checkpoint does not fit {name}: {detail}; {hint}")
    model.load_state_dict(cleaned, strict=True)
