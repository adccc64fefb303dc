"""Built-in presets: the YAML files in ``rpat/configs/`` and the paper's grid, composed by name.

A preset is a plain dict of config values (``rpat.config.build_config`` merges it over the defaults).

The grid
--------
Grid presets are composed from parts instead of being stored as 144 YAML files::

    bench/<dataset>/<arch>/<norm>/<method>/<variant>

    dataset  cifar10 | cifar100 | tiny-imagenet
    arch     resnet18 | preact_resnet18 | wrn34_10
    norm     linf (ε 8/255, step 2/255) | l2 (ε 128/255, step 32/255)
    method   pgd_at | trades | mart | consistency_at
    variant  base (no RPAT) | rpat (RPAT, logits proxy)
             | rpat-second_to_last | rpat-third_to_last (the Table 5 proxy variants)
             | awp | awp-rpat (AWP without / with RPAT, for an AWP ± RPAT table)

Every cell is the paper's benchmark setting (Sec. 5.2): PGD-10 training attack,
SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 110 epochs with lr ×0.1
at epochs 100 and 105, RPAT λ = 1, a = 0.5, PGD-20 held-out selection on 1,000
test images. ``base``/``rpat`` over all parts are the 144 cells of the benchmark
grid; Table 5 is ``bench/cifar10/resnet18/linf/pgd_at/{base,rpat,rpat-second_to_last,
rpat-third_to_last}``. ``grid_preset(name)`` returns the preset's dict (as a
YAML preset would load), ``grid_names()`` lists them all.

The ``awp`` variants add adversarial weight perturbation (``awp.enabled``) to the same cell, with
the published γ of the method family (csdongxian/AWP): 0.01 and no AWP warm-up for the CE-trained
methods (AT-AWP: pgd_at, consistency_at), γ = 5e-3 from (1-based) epoch 10 for the KL-regularized
ones (TRADES-AWP: trades, mart). ``grid_names(("awp", "awp-rpat"))`` is the AWP ± RPAT grid.
"""

from __future__ import annotations

from importlib import resources
from itertools import product
from typing import Any, NamedTuple

import yaml

from .errors import InputError

# ---- the grid ------------------------------------------------------------------------
GRID_PREFIX = "bench"
GRID_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet")
GRID_ARCHS: tuple[str, ...] = ("resnet18", "preact_resnet18", "wrn34_10")
GRID_NORMS: tuple[str, ...] = ("linf", "l2")
GRID_METHODS: tuple[str, ...] = ("pgd_at", "trades", "mart", "consistency_at")


class GridVariant(NamedTuple):
    """What a grid variant adds to a cell: the RPAT proxy (None: RPAT off) and whether AWP is on."""

    proxy: str | None
    awp: bool = False


#: variant -> what it adds. ``base``/``rpat`` make the 144-cell grid.
GRID_VARIANTS: dict[str, GridVariant] = {
    "base": GridVariant(None), "rpat": GridVariant("logits"),
    "rpat-second_to_last": GridVariant("second_to_last"), "rpat-third_to_last": GridVariant("third_to_last"),
    "awp": GridVariant(None, awp=True), "awp-rpat": GridVariant("logits", awp=True),
}
#: the published AWP (γ, 0-based warm-up epochs) per method family (csdongxian/AWP): AT-AWP's for the CE-trained
#: methods, TRADES-AWP's for the KL-regularized ones (its script counts epochs from 1: AWP from epoch 10 is
#: awp.warmup_epochs 9); MART-AWP's own values are not in the released code
GRID_AWP: dict[str, tuple[float, int]] = {
    "pgd_at": (0.01, 0), "consistency_at": (0.01, 0), "trades": (5e-3, 9), "mart": (5e-3, 9),
}
GRID_PATTERN = (f"{GRID_PREFIX}/{{{','.join(GRID_DATASETS)}}}/{{{','.join(GRID_ARCHS)}}}/"
                f"{{{','.join(GRID_NORMS)}}}/{{{','.join(GRID_METHODS)}}}/{{{','.join(GRID_VARIANTS)}}}")
_BUDGETS = {"linf": ("8/255", "2/255"), "l2": ("128/255", "32/255")}

def grid_names(variants: tuple[str, ...] = ("base", "rpat")) -> list[str]:
    """All grid preset names with the given variants (default: the 144 benchmark cells)."""
    return ["/".join((GRID_PREFIX, *parts))
            for parts in product(GRID_DATASETS, GRID_ARCHS, GRID_NORMS, GRID_METHODS, variants)]


def grid_preset(name: str) -> dict[str, Any] | None:
    """The config dict of grid preset ``name``; None when ``name`` is not a grid name.

    Raises InputError when ``name`` starts with ``bench/`` but a part is invalid.
    """
    parts = name.split("/")
    if parts[0] != GRID_PREFIX:
        return None
    allowed = (GRID_DATASETS, GRID_ARCHS, GRID_NORMS, GRID_METHODS, tuple(GRID_VARIANTS))
    what = ("dataset", "arch", "norm", "method", "variant")
    if len(parts) != 6:
        raise InputError(f"grid preset {name!r} must look like {GRID_PREFIX}/DATASET/ARCH/NORM/METHOD/VARIANT")
    for part, ok, w in zip(parts[1:], allowed, what, strict=True):
        if part not in ok:
            raise InputError(f"grid preset {name!r}: unknown {w} {part!r}; valid: {', '.join(ok)}")
    _, dataset, arch, norm, method, variant = parts
    eps, step = _BUDGETS[norm]
    proxy, awp = GRID_VARIANTS[variant]
    gamma, awp_warmup = GRID_AWP[method]
    cell = {
        "data": {"dataset": dataset, "batch_size": 128, "augment": True},
        "model": {"arch": arch},
        "attack": {"norm": norm, "eps": eps, "step_size": step, "steps": 10},
        "method": {"name": method},
        "rpat": {"enabled": proxy is not None, "lam": 1.0, "alpha": 0.5, "proxy": proxy or "logits"},
        "optim": {"epochs": 110, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "piecewise",
                  "milestones": [100, 105], "gamma": 0.1},
        "eval": {"n_examples": 1000, "steps": 20},
    }
    if awp:
        cell["awp"] = {"enabled": True, "gamma": gamma, "warmup_epochs": awp_warmup}
    return cell



# ---- the YAML presets ---------------------------------------------------------------
def list_presets() -> list[str]:
    files = resources.files("rpat") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


PRESET_DESCRIPTIONS = {
    "cifar10_benchmark": "PGD-AT, CIFAR-10, ResNet-18, l-inf 8/255, 110 epochs (paper Table 1); --rpat adds RPAT",
    "cifar10_benchmark_l2": "cifar10_benchmark under l2: eps 128/255, step 32/255",
    "cifar10_benchmark_rpat": "PGD-AT + RPAT (lambda 1, a 0.5, logits), otherwise cifar10_benchmark",
    "cifar10_rebat": "ReBAT (Table 6): PreActResNet-18, 200 epochs, weight averaging + BoAT term, validation split",
    "cifar10_rebat_strong": "ReBAT $: cifar10_rebat with eps 10/255, 12 steps after the first lr decay",
    "cifar10_rpatpp": "RPAT++ (Table 6): cifar10_rebat with the robust-perception teacher target",
    "cifar10_rpatpp_strong": "RPAT++ $: cifar10_rpatpp with eps 10/255, 12 steps after the first lr decay",
    "cifar10_sota": "PGD-AT, CIFAR-10, PreActResNet-18, 200 epochs, lr x0.1 at 100 and 150 (paper Sec. 5.3)",
    "cifar10_trades_awp": "TRADES-AWP: WRN-34-10, TRADES beta 6 + AWP gamma 5e-3 from epoch 10, 200 epochs, lr 0.1 "
                          "x0.1 at 100/150 (csdongxian/AWP trades_AWP/train_trades_cifar.py)",
    "cifar10_pgdat_awp": "AT-AWP: PreActResNet-18, PGD-AT + AWP gamma 0.01, 200 epochs, lr 0.1 x0.1 at 100/150, "
                         "wd 5e-4 (csdongxian/AWP AT_AWP/train_cifar10.py)",
    "cifar10_generated_trades": "Wang et al. 2023 1M-generated recipe: WRN-28-10 Swish, TRADES beta 5, label "
                                "smoothing 0.1, EMA 0.995 + warm-up, 70% generated/batch, batch 512, lr 0.2 cosine, "
                                "400 epochs; needs data.extra (wzekai99/DM-Improves-AT README.md, train-wa.py)",
    "cifar10_generated_trades_rpat": "cifar10_generated_trades + RPAT (lambda 1, a 0.5, logits); needs data.extra "
                                     "(wzekai99/DM-Improves-AT README.md, train-wa.py)",
    "cifar10_cpu_quick": "quick real-data CPU run: small CNN, 5,000 CIFAR-10 train images, 5 epochs, ~7 min/2 cores",
    "digits_demo": "the offline CPU demo: small CNN on 8x8 digits, l-inf 32/255, 10 epochs (rpat demo)",
}


def preset_description(name: str) -> str:
    """One line on what a built-in preset trains (its YAML's first comment line when not listed above)."""
    if name in PRESET_DESCRIPTIONS:
        return PRESET_DESCRIPTIONS[name]
    text = (resources.files("rpat") / "configs" / f"{name}.yaml").read_text()
    first = next((ln for ln in text.splitlines() if ln.startswith("#")), "#")
    return first.lstrip("# ").strip()


def preset_dict(name: str) -> dict[str, Any]:
    """A built-in preset's values: a YAML file in ``configs/``, or a composed grid name ``bench/...``."""
    grid = grid_preset(name)
    if grid is not None:
        return grid
    if name not in list_presets():
        raise InputError(f"unknown preset {name!r}; valid: {', '.join(list_presets())} or {GRID_PATTERN}")
    text = (resources.files("rpat") / "configs" / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


#: The 1M EDM-generated CIFAR-10 images of Wang et al. 2023 (README of wzekai99/DM-Improves-AT).
GENERATED_CIFAR10_1M = "https://huggingface.co/datasets/P2333/DM-Improves-AT/resolve/main/cifar10/1m.npz"
#: preset -> {dotted config key: what to give}: keys a preset cannot train without (checked by
#: :func:`check_preset_requirements` when the config is built, before any data is read).
PRESET_REQUIRES: dict[str, dict[str, str]] = {
    name: {"data.extra": f"the generated images, e.g. data.extra=PATH/1m.npz (download {GENERATED_CIFAR10_1M})"}
    for name in ("cifar10_generated_trades", "cifar10_generated_trades_rpat")
}


def check_preset_requirements(name: str | None, values: dict[str, Any]) -> None:
    """InputError (one line) when preset ``name`` needs a key that ``values`` (``Config.to_dict()``) leaves empty.

    Example: ``cifar10_generated_trades`` without ``data.extra`` -> ``preset cifar10_generated_trades needs
    data.extra: the generated images, e.g. data.extra=PATH/1m.npz (download https://...)``.
    """
    for key, what in PRESET_REQUIRES.get(name or "", {}).items():
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or node == "":
            raise InputError(f"preset {name} needs {key}: {what}")


