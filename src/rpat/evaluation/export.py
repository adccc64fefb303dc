"""``rpat export``: an rpat checkpoint's evaluated model as a ``.safetensors`` file with a model card in its header.

The file holds the weights of the model rpat evaluates (the weight-averaged model when the run averaged:
best.pt / final.pt / epochs/ already store it, last.pt keeps it under ``averaged``), keys without a DDP
``module.`` prefix, sorted by name, and a header of strings (:func:`model_card`):

    format               rpat-model                  format_version   1
    arch                 resnet18                    num_classes      10
    in_chans             3                           input_range      [0, 1]
    normalization        none, or {"mean": [...], "std": [...]} (JSON; rpat's model applies it inside)
    threat_norm          linf                        threat_eps       8/255 (pixel units of [0, 1])
    threat_model         linf eps=8/255              the training threat, as rpat prints it
    dataset              cifar10                     epoch            completed epochs of the weights
    weights              averaged | online           evaluated_model  a sentence saying which
    metrics              {"clean": ..., "pgd": ..., "aa": ..., "mean": ..., "nrr": ...} (JSON, percent)
    metrics_source       where the numbers come from (a report of this very file, or held-out numbers)
    model_kwargs, config the checkpoint's model sizes and run config (JSON), so ``rpat eval`` needs no --arch
    model_sha256         SHA-256 of the tensors (verified when rpat loads the file)
    source_checkpoint    file name and SHA-256 of the checkpoint exported
    rpat_version

``rpat eval model.safetensors`` loads it like the checkpoint it came from
(:func:`rpat.checkpoint.load_checkpoint`), dataset and threat model included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import run_dir as rd
from ..attacks.threat import format_budget
from ..checkpoint import is_rpat_checkpoint, load_checkpoint, state_dict_sha256
from ..config import config_from_dict
from ..errors import InputError
from ..models import create_model, load_weights
from ..models.safetensors_io import DIGEST_HEADER, HEADER_FORMAT, HEADER_VERSION, SUFFIX, save_safetensors
from .checkpoint_eval import checkpoint_identity

#: The report keys copied into the header's ``metrics`` (those a report has and that are not None; aa, mean
#: and nrr of a non-standard AutoAttack version are named ``aa_<version>`` etc., never plain ``aa``).
METRIC_KEYS = ("clean", "pgd", "aa", "mean", "nrr", "cw", "noise", "transfer", "cw_art")


def evaluated_weights(ckpt: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict of the evaluated model and ``"averaged"``/``"online"``: last.pt's ``averaged`` (WA
    model) when it has one, else ``model`` as best/final/epoch checkpoints store it (tagged ``weights``)."""
    if isinstance(ckpt.get("averaged"), dict):
        return ckpt["averaged"], "averaged"
    return ckpt["model"], str(ckpt.get("weights", "online"))


def headline_metrics(checkpoint: str | Path, ckpt: dict[str, Any]) -> tuple[dict[str, float], str]:
    """``(metrics in percent, where they come from)`` for the header.

    In this order: the report beside the checkpoint (``eval_<name>.json`` or ``<name>.eval.json``,
    :func:`rpat.run_dir.find_report`) when it was made of this very file (same SHA-256); else the held-out
    numbers stored in the checkpoint (best.pt, epochs/); else the run's ``metrics.jsonl`` row of its epoch;
    else none (``{}``, said so)."""
    path = Path(checkpoint)
    report_path = rd.find_report(path.parent, path.stem)
    report = rd.read_report(report_path) if report_path is not None else None
    if report is not None:
        made_of = ((report.get("settings") or {}).get("checkpoint") or {}).get("sha256")
        if made_of == checkpoint_identity(path)["sha256"]:
            version = str(report.get("autoattack") or (report.get("extras") or {}).get("aa_version") or "none")
            # only standard AutoAttack is "aa": another version's numbers carry its name (aa_apgd, mean_apgd, ...)
            names = {k: (f"{k}_{version}" if k in ("aa", "mean", "nrr") and version != "standard" else k)
                     for k in METRIC_KEYS}
            metrics = {names[k]: float(report[k]) for k in METRIC_KEYS if isinstance(report.get(k), (int, float))}
            aa = "no AutoAttack" if version == "none" else f"AutoAttack {version}"
            source = (f"report {report_path.name} of this checkpoint: {report.get('n_examples')} "
                      f"{report.get('dataset')} test images, PGD-{report.get('pgd_steps')} {report.get('threat')}, "
                      f"{aa}")
            return metrics, source
    run = path.parent.parent if path.parent.name == rd.EPOCHS_DIR else path.parent
    where = rd.held_out_of(rd.read_meta(run)) or "held-out images"
    epoch = ckpt.get("epoch")
    held = ckpt.get("held_out")
    if isinstance(held, dict) and {"clean", "pgd"} <= set(held):
        return ({"clean": float(held["clean"]), "pgd": float(held["pgd"])},
                f"held-out accuracy during training ({where}, epoch {epoch}), stored in {path.name}; "
                "not a test-set evaluation (no report of this file beside it)")
    rows = [r for r in rd.read_metrics(run) if r.get("epoch_number") == epoch] if rd.is_run_dir(run) else []
    if rows:
        return ({"clean": float(rows[-1]["held_out_clean"]), "pgd": float(rows[-1]["held_out_pgd"])},
                f"held-out accuracy during training ({where}, epoch {epoch}), from {rd.METRICS}; "
                "not a test-set evaluation (no report of this file beside it)")
    return {}, "none: no report of this file beside it and no held-out numbers in it"


def model_card(checkpoint: str | Path, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The header of the export of ``ckpt`` (an rpat checkpoint read from ``checkpoint``), whose evaluated
    weights are ``state``: every value a string (see the module docstring for the fields)."""
    cfg = config_from_dict(ckpt["config"])
    threat = cfg.train_threat()
    kwargs = dict(ckpt["model_kwargs"])
    mean, std = kwargs.get("mean"), kwargs.get("std")
    metrics, source = headline_metrics(checkpoint, ckpt)
    _, weights = evaluated_weights(ckpt)
    a = cfg.averaging
    evaluated = (f"weight average (EMA decay {a.decay}, from epoch {a.start_epoch + 1})" if weights == "averaged"
                 else "the trained (online) model")
    ident = checkpoint_identity(checkpoint)
    return {
        "format": HEADER_FORMAT, "format_version": str(HEADER_VERSION), "rpat_version": __version__,
        "arch": str(ckpt["arch"]), "num_classes": str(kwargs.get("num_classes")),
        "in_chans": str(kwargs.get("in_chans", 3)), "input_range": "[0, 1]",
        "normalization": "none" if mean is None else json.dumps({"mean": list(mean), "std": list(std)}),
        "threat_norm": threat.norm, "threat_eps": format_budget(threat.eps),
        "threat_model": f"{threat.norm} eps={format_budget(threat.eps)}", "dataset": cfg.data.dataset,
        "epoch": str(int(ckpt.get("epoch", 0))), "weights": weights, "evaluated_model": evaluated,
        "metrics": json.dumps(metrics), "metrics_source": source,
        "model_kwargs": json.dumps(kwargs), "config": json.dumps(ckpt["config"]),
        DIGEST_HEADER: state_dict_sha256(state),
        "source_checkpoint": f"{Path(checkpoint).name} sha256={ident['sha256']}",
    }


def export_safetensors(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, str]:
    """Write the evaluated model of rpat checkpoint ``checkpoint`` to ``out`` (``.safetensors``) with its
    model card (:func:`model_card`); returns the header. One-line InputErrors, before anything is written:
    ``out`` not ending in ``.safetensors``, ``out`` existing without ``overwrite``, ``checkpoint`` missing,
    unreadable, not an rpat checkpoint (a plain state_dict) or already an export. The weights are loaded into
    the architecture first (:func:`rpat.models.load_weights`: DDP ``module.`` prefixes stripped, every key
    and shape checked), so the file holds exactly the model's state_dict, bit for bit."""
    out = Path(out)
    if out.suffix != SUFFIX:
        raise InputError(f"the output {str(out)!r} must end in {SUFFIX} (e.g. model{SUFFIX})")
    if out.exists() and not overwrite:
        raise InputError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    if Path(checkpoint).suffix == SUFFIX:
        raise InputError(f"{str(checkpoint)!r} is already a safetensors file; export its rpat checkpoint (.pt)")
    ckpt = load_checkpoint(checkpoint)
    if not is_rpat_checkpoint(ckpt):
        raise InputError(f"{str(checkpoint)!r} is not an rpat checkpoint (a plain state_dict has no architecture, "
                         "config or threat model to put in the header); export best.pt, final.pt, last.pt or "
                         "epochs/epoch_NNNN.pt of an rpat run")
    weights, _ = evaluated_weights(ckpt)
    model = create_model(ckpt["arch"], **ckpt["model_kwargs"])
    load_weights(model, weights, arch=ckpt["arch"])
    state = dict(sorted(model.state_dict().items()))
    header = model_card(checkpoint, ckpt, state)
    save_safetensors(out, state, header)
    return header
