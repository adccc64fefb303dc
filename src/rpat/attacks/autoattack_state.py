"""AutoAttack's resumable state: the settings' fingerprint and the state JSON + ``.pt`` files it is saved in.

The loop (:mod:`rpat.attacks.autoattack`) saves a :class:`State` after the clean
pass and after each attack with :func:`save_state` (rank 0 only) and reads it
back at the start with :func:`load_state`. On disk: the JSON at ``path``
(format, fingerprint, finished stages and their records, robust flags) and
``<name>.<k>.pt`` beside it (the rows of ``x_adv`` that differ from ``x``),
each written atomically (:func:`rpat.utils.atomic_write`): the ``.pt`` of a
stage first, then the JSON that names it, then the previous ``.pt`` is dropped,
so a kill at any moment leaves a consistent state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..utils import atomic_write
from .threat import ThreatModel

STATE_FORMAT = "rpat-autoattack-state/1"


@dataclass
class State:
    """What the loop has finished: stages (``clean`` then attacks), their records, flags, x_adv rows."""

    done: list[str] = field(default_factory=list)
    per_attack: list[dict[str, Any]] = field(default_factory=list)


def _sha256(tensors: Iterator[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, version: str, seed: int,
                batch_size: int, attacks: list[str], n_targets: int) -> dict[str, Any]:
    """The settings an AutoAttack state belongs to (the world size is not one: the split is exact)."""
    return {"version": version, "norm": threat.norm, "eps": float(threat.eps), "seed": seed,
            "n": int(x.shape[0]), "batch_size": batch_size, "attacks": attacks,
            "n_target_classes": n_targets, "x_sha256": _sha256(iter([x])),
            "y_sha256": _sha256(iter([y])), "model_sha256": _sha256(iter(model.state_dict().values()))}


def save_state(path: Path, fingerprint: dict, state: State, robust: Tensor, x_adv: Tensor,
               x: Tensor) -> None:
    """Write the ``.pt`` of this stage, then the JSON that names it (both atomically), then drop the old ``.pt``."""
    idx = (x_adv != x).flatten(1).any(1).nonzero().flatten()
    pt = path.with_name(f"{path.name}.{len(state.done)}.pt")
    with atomic_write(pt, "wb") as f:
        torch.save({"index": idx, "x_adv": x_adv[idx].clone()}, f)
    old = _read_json(path)
    doc = {"format": STATE_FORMAT, "fingerprint": fingerprint, "done": state.done,
           "per_attack": state.per_attack, "robust": "".join("1" if b else "0" for b in robust.tolist()),
           "x_adv_file": pt.name}
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, indent=1))
    if old and old.get("x_adv_file") not in (None, pt.name):
        path.with_name(old["x_adv_file"]).unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the AutoAttack state {path}: {e}") from None


def load_state(path: Path, fingerprint: dict, x: Tensor) -> tuple[State, Tensor, Tensor] | None:
    """The saved ``(state, robust, x_adv)``, None without a file; InputError if it is for other settings."""
    doc = _read_json(path)
    if doc is None:
        return None
    if doc.get("format") != STATE_FORMAT:
        raise InputError(f"{path} is not an rpat AutoAttack state; delete it or pass another state path")
    saved = doc["fingerprint"]
    differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differ:
        raise InputError(f"the AutoAttack state {path} was written for other settings (differs in: "
                         f"{', '.join(differ)}); delete it or pass another state path")
    robust = torch.tensor([c == "1" for c in doc["robust"]], dtype=torch.bool)
    try:
        rows = torch.load(path.with_name(doc["x_adv_file"]), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise InputError(f"the AutoAttack state {path} lacks its images ({doc['x_adv_file']}): {e}") from None
    x_adv = x.clone()
    x_adv[rows["index"]] = rows["x_adv"]
    return State(list(doc["done"]), list(doc["per_attack"])), robust, x_adv
