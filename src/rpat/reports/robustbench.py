"""RobustBench's evaluation protocol and its result file (``model_info/<dataset>/<threat>/<NAME>.json``).

What RobustBench does, and where each fact comes from (``RobustBench/robustbench``, master of March 2025):

* ``robustbench.eval.benchmark(model, n_examples=10000, dataset="cifar10", threat_model="Linf", ...,
  batch_size=32, eps=None, ...)``: clean accuracy, then ``AutoAttack(model, norm=threat_model, eps=eps,
  version="standard")`` run with ``bs=batch_size``, on the same images. ``eps`` has no default there
  (a ValueError for Linf/L2 without it); the leaderboard's values are those the ``model_info`` files
  record: CIFAR-10 ℓ∞ ``"8/255"``, CIFAR-10 ℓ2 ``"0.5"``, CIFAR-100 ℓ∞ ``"8/255"``, ImageNet ℓ∞
  ``"4/255"`` (no CIFAR-100 or ImageNet ℓ2 board exists). The command line ``python -m robustbench.eval``
  has other defaults (``--n_ex 100``, ``--batch_size 500``, ``--eps 8/255``); ``benchmark()``'s are used here.
* ``robustbench.data._load_dataset``: the test set through a ``DataLoader(shuffle=False)``, cut to
  ``[:n_examples]``: the *first* ``n_examples`` test images, in order (rpat's
  :func:`rpat.data.evaluation_indices` takes the same ones for CIFAR). ``load_imagenet`` takes a fixed list
  of 5,000 validation images and refuses more.
* ``robustbench.utils.ModelInfo`` (the dataclass the file is made from) has ``link``, ``name``, ``authors``,
  ``additional_data``, ``number_forward_passes``, ``dataset``, ``venue``, ``architecture``, ``eps``,
  ``clean_acc``, ``reported``, ``corruptions_acc``, ``corruptions_acc_3d``, ``corruptions_mce``,
  ``corruptions_mce_3d``, ``autoattack_acc``, ``footnote``; the leaderboard template
  (``robustbench/leaderboard/leaderboard.html.j2``) also reads ``unreliable`` ("AA eval. potentially
  unreliable", ``Unknown`` when absent; Linf/L2 boards only) and ``external`` ("best known robust
  accuracy", the AA number when absent), and shows ``footnote`` unless it is null.
* ``robustbench.utils.update_json``: the path is ``model_info/<dataset>/<threat_model>/<model_name>.json``
  (parents created); an existing file is ``dict.update``-d with the fields of a new ``ModelInfo`` holding
  only ``dataset``, ``eps``, ``clean_acc`` and the measured accuracy (``autoattack_acc``, or
  ``corruptions_acc`` and ``corruptions_mce``), skipping those that are None: every other field of the
  existing file is kept. Without a file it writes every ModelInfo field (None as null). JSON, ``indent=2``.

Where rpat writes differently, on purpose:

* accuracies: ``update_json`` writes ``str(round(100 * acc, 2))`` (``"85.6"``), but the leaderboard's own
  files write two decimals (235 of 236 ``clean_acc`` values: ``"85.60"`` style); rpat writes two decimals
  always. RobustBench reads both with ``float()``.
* ``eps``: ``update_json`` writes the float it was given (``0.03137...``); the leaderboard's files write
  ``"8/255"`` / ``"0.5"`` strings, and so does rpat. For corruptions ``eps`` is null (nothing overwritten).
* writes are atomic (:func:`rpat.utils.write_text_atomic`); the file is ASCII JSON with ``indent=2``.

Defaults for descriptive fields not given (the new-file case): ``link``/``name``/``authors``/``venue`` ``""``
(RobustBench's ``Standard.json`` has ``"authors": ""``; ``list_available_models`` shows a venue ``""`` as
"Unpublished"), ``architecture`` the evaluated rpat architecture, ``additional_data`` false,
``number_forward_passes`` 1, ``unreliable`` false, ``footnote`` null, and ``reported`` null: it is the
number the *paper* reported, which RobustBench fills in by hand (the README: "The other fields have to be
filled manually"); rpat does not guess it from its own measurement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..data import get_spec
from ..errors import InputError
from ..utils import write_text_atomic

__all__ = [
    "DATASETS", "LEADERBOARD_EPS", "MEASURED_FIELDS", "METADATA_FIELDS", "MODEL_INFO_FIELDS", "THREAT_MODELS",
    "check_metadata", "check_normalization", "format_accuracy", "load_metadata", "merge_metadata",
    "model_info_entry", "model_info_path", "protocol_deviations", "robustbench_settings", "threat_model_of",
    "update_model_info", "write_model_info",
]

#: RobustBench's datasets (``BenchmarkDataset`` values) -> test images its protocol can use.
DATASETS: dict[str, int] = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
#: RobustBench's threat models for which rpat writes files (``ThreatModel`` values; not ``corruptions_3d``).
THREAT_MODELS: tuple[str, ...] = ("Linf", "L2", "corruptions")
#: rpat's norm names -> RobustBench's threat model names.
_NORM_TO_THREAT: dict[str, str] = {"linf": "Linf", "l2": "L2"}
#: The leaderboards' ε, as their model_info files write it: (dataset, threat) -> (value, text).
LEADERBOARD_EPS: dict[tuple[str, str], tuple[float, str]] = {
    ("cifar10", "Linf"): (8 / 255, "8/255"),
    ("cifar10", "L2"): (0.5, "0.5"),
    ("cifar100", "Linf"): (8 / 255, "8/255"),
    ("imagenet", "Linf"): (4 / 255, "4/255"),
}
#: The leaderboards of common corruptions (no ε).
_CORRUPTION_BOARDS: frozenset[str] = frozenset({"cifar10", "cifar100", "imagenet"})
#: ``robustbench.eval.benchmark``'s defaults.
BENCHMARK_N_EXAMPLES = 10_000
BENCHMARK_BATCH_SIZE = 32
#: The fields written for each threat model, in ModelInfo's order (``external`` only when given).
MODEL_INFO_FIELDS: dict[str, tuple[str, ...]] = {
    "Linf": ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
             "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable", "footnote"),
    "corruptions": ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                    "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_mce",
                    "footnote"),
}
MODEL_INFO_FIELDS["L2"] = MODEL_INFO_FIELDS["Linf"]
#: The fields an evaluation measures (``update_json`` overwrites these; a None value never overwrites).
MEASURED_FIELDS: dict[str, tuple[str, ...]] = {
    "Linf": ("dataset", "eps", "clean_acc", "autoattack_acc"),
    "L2": ("dataset", "eps", "clean_acc", "autoattack_acc"),
    "corruptions": ("dataset", "eps", "clean_acc", "corruptions_acc", "corruptions_mce"),
}
_STR_FIELDS = ("link", "name", "authors", "venue", "architecture", "footnote")
_BOOL_FIELDS = ("additional_data", "unreliable")
#: The keys metadata (a YAML file, flags) may give: the descriptive fields of the file.
METADATA_FIELDS: tuple[str, ...] = ("link", "name", "authors", "additional_data", "number_forward_passes", "venue",
                                    "architecture", "reported", "external", "unreliable", "footnote")
_DEFAULTS: dict[str, Any] = {"link": "", "name": "", "authors": "", "additional_data": False,
                             "number_forward_passes": 1, "venue": "", "reported": None, "unreliable": False,
                             "footnote": None}


def _dataset(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise InputError(f"RobustBench has no dataset {name!r}; valid: {', '.join(DATASETS)}")
    return key


def _threat(name: str) -> str:
    text = str(name).strip()
    for t in THREAT_MODELS:
        if text.lower() == t.lower():
            return t
    raise InputError(f"RobustBench has no threat model {name!r}; valid: {', '.join(THREAT_MODELS)} "
                     f"(or rpat's {', '.join(_NORM_TO_THREAT)})")


def robustbench_settings(dataset: str, threat: str, n_examples: int | None = None,
                         batch_size: int | None = None) -> dict[str, Any]:
    """The settings of RobustBench's ``benchmark()`` for ``dataset`` and ``threat``, resolved.

    ``threat``: ``Linf``, ``L2`` or ``corruptions`` (rpat's ``linf``/``l2`` too). Returns
    ``{"dataset", "threat_model", "norm", "eps", "eps_text", "n_examples", "subset", "batch_size",
    "autoattack", "full_test_set"}``:

    * ``n_examples``: ``benchmark()``'s default 10,000 (``robustbench/eval.py``), the first ones in order
      (``robustbench/data.py``, ``_load_dataset``: ``shuffle=False`` then ``[:n_examples]``); more than the
      test set has gives the whole set (the slice). ImageNet: 5,000 (``load_imagenet`` refuses more).
    * ``batch_size``: ``benchmark()``'s default 32 (used for clean accuracy and AutoAttack's ``bs``).
    * ``eps`` / ``eps_text``: the leaderboard's ε as its ``model_info`` files write it (``8/255`` ℓ∞ CIFAR,
      ``0.5`` ℓ2 CIFAR-10, ``4/255`` ℓ∞ ImageNet); None for corruptions. ``norm`` is rpat's name
      (``linf``/``l2``; None for corruptions), ``autoattack`` ``"standard"`` (None for corruptions).

    A combination without a leaderboard (e.g. CIFAR-100 ℓ2) or a count below 1 is an InputError.
    """
    ds = _dataset(dataset)
    tm = _NORM_TO_THREAT.get(str(threat).strip().lower()) or _threat(threat)
    if tm == "corruptions":
        eps = eps_text = None
        if ds not in _CORRUPTION_BOARDS:
            raise InputError(f"RobustBench has no corruptions leaderboard for {ds}")
    else:
        if (ds, tm) not in LEADERBOARD_EPS:
            boards = ", ".join(f"{d}/{t}" for d, t in LEADERBOARD_EPS)
            raise InputError(f"RobustBench has no {tm} leaderboard for {ds}; boards with an ε: {boards}")
        eps, eps_text = LEADERBOARD_EPS[(ds, tm)]
    n_max = DATASETS[ds]
    n = min(BENCHMARK_N_EXAMPLES, n_max) if n_examples is None else int(n_examples)
    if n < 1:
        raise InputError(f"n_examples must be >= 1, got {n}")
    if ds == "imagenet" and n > n_max:
        raise InputError(f"RobustBench evaluates ImageNet on at most {n_max} images, got n_examples={n}")
    n = min(n, n_max)
    bs = BENCHMARK_BATCH_SIZE if batch_size is None else int(batch_size)
    if bs < 1:
        raise InputError(f"batch_size must be >= 1, got {bs}")
    return {
        "dataset": ds, "threat_model": tm, "norm": None if tm == "corruptions" else tm.lower(),
        "eps": eps, "eps_text": eps_text, "n_examples": n, "subset": f"the first {n} test images, in order",
        "batch_size": bs, "autoattack": None if tm == "corruptions" else "standard",
        "full_test_set": n == n_max,
    }


def model_info_path(root: str | Path, dataset: str, threat_model: str, name: str) -> Path:
    """``<root>/model_info/<dataset>/<Linf|L2|corruptions>/<name>.json`` (``update_json``'s layout).

    ``root`` is the folder holding ``model_info`` (a RobustBench checkout). ``name`` is RobustBench's model
    name (``<Name><Year><FirstWordOfTheTitle>``, e.g. ``Rice2020Overfitting``): one file name, no folders.
    """
    ds = _dataset(dataset)
    tm = _NORM_TO_THREAT.get(str(threat_model).strip().lower()) or _threat(threat_model)
    stem = str(name).strip().removesuffix(".json")
    if not stem or stem in {".", ".."} or any(c in stem for c in "/\\") or stem.startswith("."):
        raise InputError(f"RobustBench model name {name!r}: give one file name such as Rice2020Overfitting")
    return Path(root) / "model_info" / ds / tm / f"{stem}.json"


def format_accuracy(percent: float) -> str:
    """An accuracy in percent as the leaderboard's files write it: a string with two decimals (``"85.60"``)."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent):
        raise InputError(f"an accuracy must be a number in percent, got {percent!r}")
    if not 0.0 <= float(percent) <= 100.0:
        raise InputError(f"an accuracy must be in percent (0-100), got {percent!r}")
    return f"{float(percent):.2f}"


def _eps_text(threat_model: str, eps: float) -> str:
    """ε as the files write it: ℓ∞ multiples of 1/255 as ``"8/255"``, anything else as a short decimal."""
    k = eps * 255
    if threat_model == "Linf" and abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{int(round(k))}/255"
    return f"{eps:.6g}"


def threat_model_of(report: Mapping[str, Any]) -> str:
    """RobustBench's threat model of an rpat report: ``report["threat_model"]`` when present (e.g.
    ``"corruptions"``), else from ``report["settings"]["threat"]["norm"]`` (``linf`` -> ``Linf``)."""
    if report.get("threat_model") is not None:
        return _NORM_TO_THREAT.get(str(report["threat_model"]).lower()) or _threat(report["threat_model"])
    norm = ((report.get("settings") or {}).get("threat") or {}).get("norm")
    if norm is None or str(norm).lower() not in _NORM_TO_THREAT:
        raise InputError("the report names no threat model: it needs settings.threat.norm (linf or l2) "
                         "or threat_model (corruptions)")
    return _NORM_TO_THREAT[str(norm).lower()]


def _report_eps(report: Mapping[str, Any]) -> float | None:
    eps = ((report.get("settings") or {}).get("threat") or {}).get("eps")
    return None if eps is None else float(eps)


def _aa_version(report: Mapping[str, Any]) -> str | None:
    version = report.get("autoattack")
    if version is None:
        version = (report.get("extras") or {}).get("aa_version")
    return None if version is None else str(version)


def protocol_deviations(report: Mapping[str, Any]) -> list[str]:
    """How an rpat report differs from RobustBench's protocol (empty when it follows it): not standard
    AutoAttack, another ε than the leaderboard's, fewer or more images than ``benchmark()``'s default."""
    ds = _dataset(report.get("dataset", ""))
    tm = threat_model_of(report)
    settings = robustbench_settings(ds, tm)
    out: list[str] = []
    if tm != "corruptions":
        version = _aa_version(report)
        if version != "standard":
            out.append(f"AutoAttack version {version!r}, not 'standard'")
        eps = _report_eps(report)
        if eps is None or abs(eps - settings["eps"]) > 1e-6:
            shown = "none" if eps is None else _eps_text(tm, eps)
            out.append(f"eps {shown}, not the leaderboard's {settings['eps_text']}")
    n = report.get("n_examples")
    if n != settings["n_examples"]:
        out.append(f"{n} test images, not the first {settings['n_examples']}")
    return out


def check_normalization(normalize: Mapping[str, Any] | None, dataset: str = "cifar10") -> None:
    """Refuse (one InputError line) an input normalization a RobustBench model cannot have.

    RobustBench models take [0, 1] images and normalize inside the model (README, "Model definition": a
    model that normalizes subclasses the architecture, e.g. ``Rice2020OverfittingNet`` with ``mu``/``sigma``;
    ``utils.load_model``: ImageNet normalization "is added as extra layer"); rpat's ``--normalize MEAN/STD``
    wraps the evaluated model the same way, so the attacks see the same [0, 1] inputs as RobustBench's.
    Representable: None (no normalization), or ``{"mean": [...], "std": [...]}`` (the report's
    ``normalize``) with one value per channel of the dataset (3 for RobustBench's datasets) or one value
    for all, finite means and finite positive stds. Anything else (e.g. 1 or 3 values for a 4- or
    1-channel input; a std of 0) is not a per-channel affine map of a [0, 1] image of that dataset.
    """
    if normalize is None:
        return
    try:  # rpat's spec when rpat knows the dataset
        channels = get_spec(dataset).in_chans
    except InputError:
        _dataset(dataset)  # an InputError for a dataset neither rpat nor RobustBench has
        channels = 3  # RobustBench's datasets are RGB
    if not isinstance(normalize, Mapping) or set(normalize) != {"mean", "std"}:
        raise InputError(f"normalization {normalize!r}: give {{'mean': [...], 'std': [...]}} (rpat --normalize)")
    mean, std = list(normalize["mean"]), list(normalize["std"])
    if len(mean) != len(std) or len(mean) not in {1, channels}:
        raise InputError(f"normalization with {len(mean)} mean and {len(std)} std value(s) is not representable "
                         f"for {dataset} ({channels} channels): give {channels} values each (or 1 for all)")
    try:
        ok = all(math.isfinite(float(m)) for m in mean) and all(
            math.isfinite(float(s)) and float(s) > 0 for s in std)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"normalization mean {mean} / std {std} is not representable: means must be finite "
                         "numbers and stds finite positive numbers")


def _accuracy_meta(key: str, value: Any) -> str:
    if isinstance(value, bool):
        raise InputError(f"RobustBench metadata {key}: give an accuracy in percent such as 53.42, got {value!r}")
    if isinstance(value, (int, float)):
        return format_accuracy(value)
    text = str(value).strip()
    try:
        format_accuracy(float(text))
    except ValueError:
        raise InputError(f"RobustBench metadata {key}: give an accuracy in percent such as 53.42, "
                         f"got {value!r}") from None
    return text  # kept as written ("58", "71.6" are in RobustBench's files)


def _bool_meta(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1"}:
        return True
    if text in {"false", "no", "0"}:
        return False
    raise InputError(f"RobustBench metadata {key}: give true or false, got {value!r}")


def check_metadata(metadata: Mapping[str, Any], source: str = "RobustBench metadata") -> dict[str, Any]:
    """Validate metadata and return it typed as the files write it (None values are dropped).

    Keys: :data:`METADATA_FIELDS`; anything else (a typo, or a measured field such as ``clean_acc``) is one
    InputError naming the keys and listing the valid ones. Strings for ``link``, ``name``, ``authors``,
    ``venue``, ``architecture``, ``footnote``; booleans (``true``/``false``) for ``additional_data`` and
    ``unreliable``; an integer >= 1 for ``number_forward_passes``; accuracies in percent for ``reported``
    and ``external`` (a number becomes a two-decimal string, a string is kept as written).
    """
    if not isinstance(metadata, Mapping):
        raise InputError(f"{source}: expected a mapping of field: value, got {type(metadata).__name__}")
    unknown = [str(k) for k in metadata if k not in METADATA_FIELDS]
    if unknown:
        measured = sorted({f for fs in MEASURED_FIELDS.values() for f in fs} & set(unknown))
        why = f" ({', '.join(measured)}: measured by the evaluation)" if measured else ""
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}{why}; valid: {', '.join(METADATA_FIELDS)}")
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if key in _STR_FIELDS:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise InputError(f"{source}: {key} must be text, got {value!r}")
            out[key] = str(value)
        elif key in _BOOL_FIELDS:
            out[key] = _bool_meta(key, value)
        elif key == "number_forward_passes":
            text = str(value).strip()
            if isinstance(value, (bool, float)) or not text.isdigit() or int(text) < 1:
                raise InputError(f"{source}: number_forward_passes must be an integer >= 1, got {value!r}")
            out[key] = int(text)
        else:  # reported, external
            out[key] = _accuracy_meta(key, value)
    return out


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata in a small YAML file (``link: ...``, ``authors: ...``; keys :data:`METADATA_FIELDS`),
    checked by :func:`check_metadata`. A missing or unparsable file is an InputError; an empty one is ``{}``."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InputError(f"cannot read RobustBench metadata {str(p)!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"RobustBench metadata {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    return check_metadata(data or {}, f"RobustBench metadata {str(p)!r}")


def merge_metadata(*parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata from several sources (e.g. the YAML file, then the flags): later ones win, None values are
    ignored (a flag not given), each part is checked (:func:`check_metadata`)."""
    out: dict[str, Any] = {}
    for part in parts:
        if part:
            out.update(check_metadata({k: v for k, v in part.items() if v is not None}))
    return out


def model_info_entry(report: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
                     allow_deviations: bool = False) -> dict[str, Any]:
    """The model_info JSON of an rpat evaluation report: every field RobustBench's files have.

    ``report``: the dict ``rpat eval`` writes (:func:`rpat.evaluation.report.write_report`): ``dataset``
    (``cifar10``/``cifar100``), ``arch``, ``n_examples``, ``clean`` and ``aa`` (percent), ``autoattack``
    (``standard``), ``settings.threat.norm``/``eps``, ``normalize``. For corruptions: ``threat_model:
    "corruptions"``, ``clean``, ``corruptions_acc`` and optionally ``corruptions_mce`` (percent).
    ``metadata``: :data:`METADATA_FIELDS` (checked); the rest defaults as the module docstring says.

    Fields (:data:`MODEL_INFO_FIELDS`): Linf/L2 ``link, name, authors, additional_data,
    number_forward_passes, dataset, venue, architecture, eps, clean_acc, reported, autoattack_acc,
    unreliable, footnote``; corruptions the same with ``corruptions_acc, corruptions_mce`` for
    ``autoattack_acc`` and without ``unreliable``; ``external`` only when given. Accuracies are
    two-decimal strings, ``eps`` ``"8/255"``/``"0.5"`` (null for corruptions).

    A report that does not follow RobustBench's protocol (:func:`protocol_deviations`) is an InputError
    unless ``allow_deviations``; so is a normalization RobustBench cannot represent.
    """
    meta = check_metadata(metadata or {})
    ds = _dataset(report.get("dataset", ""))
    tm = threat_model_of(report)
    check_normalization(report.get("normalize"), ds)
    deviations = protocol_deviations(report)
    if deviations and not allow_deviations:
        raise InputError("not RobustBench's protocol: " + "; ".join(deviations)
                         + " (evaluate with robustbench_settings(), or allow the deviation)")
    if report.get("clean") is None:
        raise InputError("the report has no clean accuracy")
    values: dict[str, Any] = {**_DEFAULTS, "architecture": str(report.get("arch") or ""), **meta,
                              "dataset": ds, "clean_acc": format_accuracy(report["clean"])}
    if tm == "corruptions":
        if report.get("corruptions_acc") is None:
            raise InputError("the report has no corruptions accuracy (corruptions_acc)")
        values["eps"] = None
        values["corruptions_acc"] = format_accuracy(report["corruptions_acc"])
        mce = report.get("corruptions_mce")
        values["corruptions_mce"] = None if mce is None else f"{float(mce):.2f}"  # mCE may exceed 100
    else:
        if report.get("aa") is None:
            raise InputError("the report has no AutoAttack accuracy (aa): evaluate with --autoattack standard")
        eps = _report_eps(report)
        values["eps"] = None if eps is None else _eps_text(tm, eps)
        values["autoattack_acc"] = format_accuracy(report["aa"])
    entry = {k: values[k] for k in MODEL_INFO_FIELDS[tm]}
    if "external" in meta:
        entry["external"] = meta["external"]
    return entry


def _measured(entry: Mapping[str, Any]) -> tuple[str, ...]:
    if "corruptions_acc" in entry:
        return MEASURED_FIELDS["corruptions"]
    return MEASURED_FIELDS["Linf"]


def update_model_info(path: str | Path, entry: Mapping[str, Any], *,
                      overwrite: Iterable[str] = ()) -> dict[str, Any]:
    """Merge ``entry`` into the model_info file at ``path`` the way ``update_json`` does; return the result.

    Without a file: ``entry`` is written as is. With one: the measured fields (:data:`MEASURED_FIELDS`:
    ``dataset``, ``eps``, ``clean_acc`` and ``autoattack_acc`` or ``corruptions_acc``/``corruptions_mce``)
    are overwritten, except by None; every other field keeps the existing file's value (hand-written
    ``link``, ``reported``, ``footnote``, ``external``, ...), and fields the file lacks or has as null
    (``update_json`` writes unfilled fields as null) are taken from ``entry``. ``overwrite`` names further
    fields to take from ``entry`` (the metadata given explicitly, e.g. ``--venue``). Parent folders are
    created; the write is atomic. An existing file that is not a JSON object is an InputError (it is left
    as it was).
    """
    p = Path(path)
    merged: dict[str, Any]
    if p.exists():
        try:
            existing = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot merge into {str(p)!r}: not a readable JSON file ({e})") from None
        if not isinstance(existing, dict):
            raise InputError(f"cannot merge into {str(p)!r}: it holds a JSON {type(existing).__name__}, "
                             "not an object")
        take = set(_measured(entry)) | set(overwrite)
        merged = dict(existing)
        for key, value in entry.items():
            if key in take:
                if value is not None:
                    merged[key] = value
            elif merged.get(key) is None:  # missing, or null as update_json writes unfilled fields
                merged[key] = value
    else:
        merged = dict(entry)
    write_text_atomic(p, json.dumps(merged, indent=2) + "\n")
    return merged


def write_model_info(root: str | Path, name: str, report: Mapping[str, Any],
                     metadata: Mapping[str, Any] | None = None, *, overwrite: Iterable[str] | None = None,
                     allow_deviations: bool = False) -> tuple[Path, dict[str, Any]]:
    """:func:`model_info_entry` + :func:`model_info_path` + :func:`update_model_info` in one call.

    ``overwrite`` defaults to the keys of ``metadata`` (metadata given now replaces the file's).
    Returns ``(path, merged dict)``.
    """
    entry = model_info_entry(report, metadata, allow_deviations=allow_deviations)
    path = model_info_path(root, entry["dataset"], threat_model_of(report), name)
    keys = list(check_metadata(metadata or {})) if overwrite is None else list(overwrite)
    return path, update_model_info(path, entry, overwrite=keys)
