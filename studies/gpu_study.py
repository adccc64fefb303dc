"""A budgeted paired study: PGD-AT vs PGD-AT + RPAT on the CIFAR-10 JPEGs, sized to a GPU window.

    python studies/gpu_study.py --data .gpu/cifar10-jpeg.tar.gz --minutes 8 --out $OUT

trains ResNet-18 with PGD-AT and with PGD-AT + RPAT (λ = 1, a = 0.5, logits), ℓ∞ 8/255,
PGD-10, batch 128, SGD lr 0.1, on all 50,000 CIFAR-10 JPEG training images, with the same
seed (same initial weights, data order and attack starts) for both runs of a pair; then
evaluates each ``final.pt`` with Clean, PGD-20 and AutoAttack (standard) on 1,000 fixed,
class-mixed test images (``rpat.data.evaluation_indices``), and writes ``study.md`` and
``study.json`` to ``--out`` (ready to commit under ``docs/results/``).

**The budget.** ``--minutes M`` covers everything from the start of the script: data,
the throughput probe, both trainings of every pair and their evaluations. The probe trains
each method for 2 short epochs of ``--probe-steps`` steps through the same ``Trainer``
(the first epoch is warm-up: CUDA-graph capture, kernel selection; the second gives img/s),
and times PGD-20 on a batch in fp32 (the evaluation's precision) to estimate the evaluation:
AutoAttack's cost is counted in forward+backward passes (:func:`estimate_eval_seconds`,
upper-bounding the robust fraction) at the measured rate. :func:`plan_study`, a pure
function, then picks the largest number of epochs for which the predicted total stays
within ``safety × M`` minutes. Pairs (``--seeds``) share the budget equally; a pair that no
longer fits what is left, measured after each pair, is skipped and reported as skipped.

**The schedule** (:func:`choose_schedule`). The paper trains 110 epochs with lr ×0.1 at
epochs 100 and 105 (1/11 of training at 0.01, 1/22 at 0.001). rpat's piecewise schedule
changes the lr at whole epochs, so the scaled milestones round(100/110·E), round(105/110·E)
keep the paper's shape only when each of the three phases gets at least one epoch, which
holds from E = 17 on. Below that the decays collapse onto one epoch or vanish, and the
study uses cosine annealing to 0, updated every step (``optim.schedule=cosine``): a short
run then still ends at a small lr, the role the paper's decays play; it is the usual choice
for short adversarial-training budgets (rpat's trainer has no one-cycle warm-up).

**Speed.** On CUDA: ``speed.amp=bf16`` (fp32 master weights; evaluation stays fp32),
``speed.channels_last=true`` and ``speed.cuda_graph=true`` when this rpat's config has that
key (detected from the ``SpeedConfig`` fields). On the CPU: fp32.

**--smoke** runs the same code path on the CPU in well under a minute (small CNN, 32
training images, batch 16, 1 epoch, 16 test images); CI runs it (``tests/test_gpu_study.py``).

On the GPU machine (no registry there; ``bash ../shared/gpu/bundle.sh`` prepares ``.gpu/``)::

    export PYTHONPATH=$PWD/.gpu/site:$PWD/src
    python studies/gpu_study.py --data .gpu/cifar10-jpeg.tar.gz --minutes 8 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rpat.config import Config, SpeedConfig, build_config
from rpat.errors import InputError

METHODS = {"pgd_at": "PGD-AT", "pgd_at_rpat": "PGD-AT + RPAT"}
METRICS = ("clean", "pgd", "aa", "mean", "nrr")
LABELS = {"clean": "Clean", "pgd": "PGD-20", "aa": "AA", "mean": "Mean", "nrr": "NRR"}
PAPER = {  # Table 5 of the paper: CIFAR-10, ResNet-18, l-inf 8/255, 110 epochs, full 10,000-image test set
    "epochs": 110, "milestones": [100, 105],
    "pgd_at": {"clean": 82.92, "aa": 46.74, "mean": 64.83, "nrr": 59.78},
    "pgd_at_rpat": {"clean": 83.20, "aa": 48.00, "mean": 65.60, "nrr": 60.88},
}
#: the paper's lr decays, as fractions of training: epochs 100 and 105 of 110
PAPER_FRACTIONS = (100 / 110, 105 / 110)
#: forward+backward passes per image of standard AutoAttack (pyautoattack, l-inf): APGD-CE runs 100
#: iterations on each image; on each image still robust after it, APGD-T runs 9 targets x 100
#: iterations, FAB-T 9 x 100 iterations (counted 1.5 passes each: gradient of a logit difference plus
#: its projection work), Square 5,000 queries of one forward each (counted 1/3 pass)
AA_PASSES_PER_IMAGE = 100.0
AA_PASSES_PER_ROBUST = 9 * 100 + 9 * 100 * 1.5 + 5000 / 3


# ---- the plan (pure functions) ------------------------------------------------------------------
def choose_schedule(epochs: int) -> tuple[str, list[int], str]:
    """``(schedule, milestones, reason)`` for ``epochs`` epochs: the paper's piecewise shape when it fits.

    Milestones are ``round(100/110·E)`` and ``round(105/110·E)`` (0-based epochs where lr ×0.1);
    piecewise when ``1 <= m1 < m2 < E`` (every phase has a whole epoch), else cosine to 0.
    """
    m = [round(f * epochs) for f in PAPER_FRACTIONS]
    if 1 <= m[0] < m[1] < epochs:
        return "piecewise", m, (f"the paper's shape scaled: lr 0.1, ×0.1 at epochs {m[0] + 1} and {m[1] + 1} "
                                f"of {epochs} (paper: 101 and 106 of 110)")
    return "cosine", [], (f"cosine annealing from 0.1 to 0, per step: with {epochs} epoch(s) the paper's decays "
                          f"at 100/110 and 105/110 of training (scaled: epochs {m}) do not fall on distinct whole "
                          "epochs, so a piecewise schedule would lose its low-lr phases")


def estimate_eval_seconds(n: int, passes_per_s: float, robust_fraction: float = 0.6, margin: float = 1.25) -> float:
    """Upper estimate of one model's evaluation (clean + PGD-20 + standard AutoAttack on ``n`` images), seconds.

    ``passes_per_s``: measured forward+backward image passes per second in fp32 (from a timed PGD-20
    batch). Passes: ``n`` (clean) + ``21·n`` (PGD-20) + ``AA_PASSES_PER_IMAGE·n`` + ``AA_PASSES_PER_ROBUST·r·n``
    with ``r = robust_fraction`` (an upper bound of the fraction still robust after APGD-CE), × ``margin``.
    """
    passes = n * (1 + 21 + AA_PASSES_PER_IMAGE) + robust_fraction * n * AA_PASSES_PER_ROBUST
    return margin * passes / passes_per_s


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_study` decided; seconds are predictions from the measured rates."""

    epochs: int
    schedule: str
    milestones: list[int]
    schedule_reason: str
    pairs: int
    budget_seconds: float
    usable_seconds: float  #: safety × budget
    elapsed_seconds: float  #: spent before the plan (data, probe)
    epoch_seconds_per_pair: float  #: one epoch of both runs, incl. per-epoch overhead
    fixed_seconds_per_pair: float  #: both runs' setup + both evaluations
    predicted_seconds: float  #: elapsed + pairs × (fixed + epochs × epoch)
    capped: bool  #: epochs lowered to max_epochs


def plan_study(
    budget_seconds: float,
    elapsed_seconds: float,
    n_train: int,
    images_per_s: Sequence[float],
    epoch_overhead_seconds: float,
    run_setup_seconds: float,
    eval_seconds_per_model: float,
    pairs: int = 1,
    safety: float = 0.9,
    max_epochs: int | None = None,
) -> Plan:
    """The most epochs such that ``pairs`` pairs of runs and their evaluations end within ``safety × budget``.

    ``images_per_s``: measured training throughput of each run of a pair (PGD-AT, PGD-AT + RPAT);
    ``epoch_overhead_seconds``: per epoch and run (held-out evaluation, checkpoints);
    ``run_setup_seconds``: per run (model, first checkpoint, warm-up);
    ``eval_seconds_per_model``: :func:`estimate_eval_seconds`. Raises InputError when not even one
    epoch fits, naming the budget that would.
    """
    if pairs < 1 or n_train < 1 or min(images_per_s) <= 0:
        raise InputError(f"plan_study needs pairs >= 1, images >= 1 and positive rates, got {pairs}, {n_train}, "
                         f"{list(images_per_s)}")
    per_epoch = sum(n_train / r for r in images_per_s) + len(images_per_s) * epoch_overhead_seconds
    fixed = len(images_per_s) * (run_setup_seconds + eval_seconds_per_model)
    usable = safety * budget_seconds
    room = (usable - elapsed_seconds) / pairs - fixed  # seconds left for the epochs of one pair
    epochs = int(room // per_epoch) if room > 0 else 0
    if epochs < 1:
        need = (elapsed_seconds + pairs * (fixed + per_epoch)) / safety
        raise InputError(f"a budget of {budget_seconds / 60:.1f} min fits no epoch of {pairs} pair(s) at the measured "
                         f"speed; one epoch needs about {need / 60:.1f} min (--minutes)")
    capped = max_epochs is not None and epochs > max_epochs
    if capped:
        epochs = int(max_epochs)
    schedule, milestones, reason = choose_schedule(epochs)
    return Plan(epochs, schedule, milestones, reason, pairs, budget_seconds, usable, elapsed_seconds, per_epoch,
                fixed, elapsed_seconds + pairs * (fixed + epochs * per_epoch), capped)


# ---- data ---------------------------------------------------------------------------------------
def extract(archive: Path, dest: Path, per_class: dict[str, int] | None = None) -> Path:
    """Extract the CIFAR-10 JPEG archive (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) into ``dest``.

    ``per_class`` (e.g. ``{"train": 8, "test": 4}``) keeps only the first files of each class by
    sorted name. Returns the image-folder root (the folder holding ``train/`` and ``test/``).
    """
    with tarfile.open(archive, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        if per_class is not None:
            groups: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
            for m in members:
                parts = m.name.removeprefix("./").split("/")
                if len(parts) == 3 and parts[0] in per_class:
                    groups.setdefault((parts[0], parts[1]), []).append(m)
            members = [m for (split, _), ms in groups.items()
                       for m in sorted(ms, key=lambda m: m.name)[: per_class[split]]]
        try:
            tf.extractall(dest, members=members, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(dest, members=members)  # noqa: S202 (the project's own archive)
    roots = [p.parent for p in dest.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    if not roots:
        raise InputError(f"{archive} holds no train/ and test/ image folders")
    return roots[0]


# ---- the runs -----------------------------------------------------------------------------------
#: Set to False when the captured step failed in the probe: the study then trains eagerly.
GRAPH_OK = True


def speed_overrides(device: torch.device) -> list[str]:
    """bf16 + channels_last (+ the CUDA graph when the config has ``speed.cuda_graph``) on CUDA; none on the CPU."""
    if device.type != "cuda":
        return []
    out = ["speed.amp=bf16", "speed.channels_last=true"]
    if GRAPH_OK and "cuda_graph" in {f.name for f in dataclasses.fields(SpeedConfig)}:
        out.append("speed.cuda_graph=true")
    return out


def make_config(args: argparse.Namespace, method: str, seed: int, epochs: int, schedule: str,
                milestones: list[int], device: torch.device, train_subset: int | None) -> Config:
    o = [
        "data.dataset=imagefolder", f"data.root={args.data_root}", f"data.batch_size={args.batch_size}",
        f"model.arch={args.arch}", "method.name=pgd_at", f"rpat.enabled={str(method == 'pgd_at_rpat').lower()}",
        "rpat.lam=1.0", "rpat.alpha=0.5", "rpat.proxy=logits", f"optim.epochs={epochs}", "optim.lr=0.1",
        f"optim.schedule={schedule}", f"optim.milestones={json.dumps(milestones)}",
        f"eval.n_examples={args.held_out}", f"seed={seed}", f"device={device}", "log_interval=1000",
        *speed_overrides(device),
    ]
    if train_subset is not None:
        o.append(f"data.train_subset={train_subset}")
    return build_config(None, None, o).validate()


def train_run(cfg: Config, run_dir: Path, train, test, log: Callable[[str], None], overwrite: bool = False) -> dict:
    """Train one config with rpat's Trainer; returns timings and the metrics rows."""
    from rpat.run_dir import read_jsonl
    from rpat.training import Trainer, prepare_data

    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, overwrite=overwrite, progress=False,
                      data=prepare_data(cfg, train, test, progress=False), log=lambda m: log(f"[{run_dir.name}] {m}"))
    t1 = time.perf_counter()
    trainer.fit()
    t2 = time.perf_counter()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return {"setup_seconds": t1 - t0, "fit_seconds": t2 - t1, "rows": rows, "n_train": len(trainer.data.train),
            "model": trainer.model}


def probe(args: argparse.Namespace, device: torch.device, train, test, work: Path, log) -> dict:
    """Measured rates: training img/s of each method (2nd of 2 short epochs), overheads, fp32 PGD passes/s."""
    from rpat.attacks import ThreatModel
    from rpat.data import evaluation_subset
    from rpat.evaluation import pgd_accuracy

    subset = args.probe_steps * args.batch_size
    out: dict = {"steps_per_epoch": args.probe_steps, "images_per_epoch": subset}
    for method in METHODS:
        cfg = make_config(args, method, 0, 2, "constant", [], device, subset)
        r = train_run(cfg, work / f"probe_{method}", train, test, lambda m: None, overwrite=True)
        secs = [row["train_seconds"] for row in r["rows"]]
        overhead = max(0.0, (r["fit_seconds"] - sum(secs)) / len(secs))
        out[method] = {"images_per_s": r["rows"][-1]["train_images_per_s"], "epoch_seconds": secs,
                       "setup_seconds": r["setup_seconds"] + max(0.0, secs[0] - secs[1]),
                       "epoch_overhead_seconds": overhead}
        log(f"probe {METHODS[method]}: {out[method]['images_per_s']:.0f} img/s (train), "
            f"setup+warm-up {out[method]['setup_seconds']:.1f} s, per-epoch overhead {overhead:.2f} s")
        model = r["model"]
    m = min(args.eval_batch, args.n_examples)
    sub = evaluation_subset("imagefolder", test, m)
    x, y = sub.images.float().div_(255), sub.labels
    threat = ThreatModel("linf", 8 / 255, 2 / 255, 20)
    model = model.to(memory_format=torch.contiguous_format)
    pgd_accuracy(model, x, y, dataclasses.replace(threat, steps=2), batch_size=m, device=device)  # warm-up
    _sync(device)
    t = time.perf_counter()
    pgd_accuracy(model, x, y, threat, batch_size=m, device=device)
    _sync(device)
    secs = time.perf_counter() - t
    out["eval"] = {"pgd20_images": m, "pgd20_seconds": secs, "passes_per_s": m * 21 / secs}
    log(f"probe evaluation: PGD-20 on {m} images in {secs:.2f} s (fp32), {m * 21 / secs:.0f} passes/s")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_run(run_dir: Path, args: argparse.Namespace, device: torch.device, log) -> dict:
    from rpat.evaluation.checkpoint_eval import evaluate_checkpoint

    t = time.perf_counter()
    report, info = evaluate_checkpoint(run_dir / "final.pt", data_root=str(args.data_root),
                                       n_examples=args.n_examples, device=str(device), seed=0, progress=False,
                                       batch_size=args.eval_batch)
    d = report.to_dict()
    log(f"[{run_dir.name}] final.pt: " + " ".join(f"{LABELS[k]} {d[k]:.2f}" for k in METRICS if d[k] is not None)
        + f" ({time.perf_counter() - t:.0f} s)")
    return {**d, "info": info, "eval_seconds": time.perf_counter() - t}


# ---- the report ---------------------------------------------------------------------------------
def paired_differences(runs: list[dict]) -> dict:
    """Per seed ``RPAT − PGD-AT`` for each metric, and their mean ± sd over seeds."""
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({s for m, s in by if m == "pgd_at" and ("pgd_at_rpat", s) in by})
    per = {s: {k: by["pgd_at_rpat", s][k] - by["pgd_at", s][k] for k in METRICS
               if by["pgd_at", s].get(k) is not None and by["pgd_at_rpat", s].get(k) is not None} for s in seeds}
    summary = {}
    for k in METRICS:
        vals = [per[s][k] for s in seeds if k in per[s]]
        if vals:
            summary[k] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None}
    return {"per_seed": {str(s): v for s, v in per.items()}, "mean_sd": summary, "seeds": seeds}


def _per_attack_lines(runs: list[dict]) -> list[str]:
    """The evaluation's per-attack report (``extras['aa_per_attack']``: ``[{"attack", "robust", "seconds"}, ...]``),
    when this rpat records one; rendered by ``rpat.evaluation.format_per_attack`` when it exists."""
    from rpat import evaluation

    fmt = getattr(evaluation, "format_per_attack", None)
    lines = []
    for r in runs:
        records = (r.get("extras") or {}).get("aa_per_attack")
        if not records:
            continue
        if fmt is not None:
            text = fmt(r)
        else:
            text = " | ".join(f"{e.get('attack')} {float(e.get('robust', float('nan'))):.2f}"
                              + (f" ({float(e['seconds']):.0f} s)" if "seconds" in e else "") for e in records)
        lines.append(f"- seed {r['seed']}, {METHODS[r['method']]}: {text}")
    if not lines:
        return []
    return ["", "AutoAttack per attack (robust accuracy after each attack, and its seconds):", "", *lines]


def write_markdown(study: dict, path: Path) -> None:
    p, runs, pd = study["plan"], study["runs"], study["paired"]
    dev = study["device"]
    epochs = p["epochs"]
    n_train = study["train_images"]
    paper_images = PAPER["epochs"] * 50000
    lines = [
        f"# {'SMOKE TEST (not a result): ' if study['smoke'] else ''}GPU study: PGD-AT vs PGD-AT + RPAT "
        "on the CIFAR-10 JPEGs, in a fixed budget",
        "",
        f"Command: `{study['command']}`",
        "",
        f"- Device: {dev['name']} ({dev['type']}); torch {study['torch']}; rpat commit {study['git_commit']}; "
        f"{study['date']}.",
        f"- Budget {study['budget_minutes']:.1f} min; used **{study['minutes_used']:.2f} min** "
        f"(predicted {p['predicted_seconds'] / 60:.2f} min; data {study['data_seconds']:.0f} s, "
        f"probe {study['probe_seconds']:.0f} s); within budget: {'yes' if study['within_budget'] else '**no**'}.",
        f"- Data: CIFAR-10 JPEG copy, {n_train:,} training images; evaluation of `final.pt` on "
        f"{study['n_examples']:,} fixed class-mixed test images (the same for every run): Clean, PGD-20 "
        "(ℓ∞ 8/255, step 2/255), AutoAttack standard.",
        f"- Training: {study['arch']}, batch {study['batch_size']}, SGD lr 0.1, momentum 0.9, wd 5e-4, "
        f"ℓ∞ 8/255 PGD-10 (step 2/255); RPAT λ = 1, a = 0.5, logits; speed options: "
        f"{', '.join(study['speed']) or 'none (fp32)'}; same seed, initial weights, data order and attack "
        "starts for both runs of a pair.",
        f"- **{epochs} epoch(s)**; schedule: {p['schedule_reason']}.",
        f"- Throughput (probe, steady state): PGD-AT {study['probe']['pgd_at']['images_per_s']:.0f} img/s, "
        f"PGD-AT + RPAT {study['probe']['pgd_at_rpat']['images_per_s']:.0f} img/s; fp32 evaluation "
        f"{study['probe']['eval']['passes_per_s']:.0f} forward+backward passes/s.",
        f"- Distance from the paper's setting: {epochs} of {PAPER['epochs']} epochs "
        f"({100 * epochs * n_train / paper_images:.3g}% of its {paper_images:,} training images seen), "
        f"final checkpoint only, {study['n_examples']:,} JPEG test images instead of the 10,000 original ones.",
    ]
    if study.get("status", "complete") != "complete":
        lines.insert(2, f"**Incomplete** (status `{study['status']}`): written before the study finished; the "
                        "table holds the evaluations done so far.\n")
    if study["skipped_seeds"]:
        lines.append(f"- Seeds skipped for lack of budget: {study['skipped_seeds']}.")
    lines += ["", "| seed | method | " + " | ".join(LABELS[k] for k in METRICS) + " | train img/s | train s | eval s |",
              "|--:|:--|" + "--:|" * (len(METRICS) + 3)]

    def cell(v: float | None, sign: bool = False) -> str:
        return "-" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")

    for s in pd["seeds"]:
        for m in METHODS:
            r = next(r for r in runs if r["method"] == m and r["seed"] == s)
            lines.append(f"| {s} | {METHODS[m]} | " + " | ".join(cell(r.get(k)) for k in METRICS)
                         + f" | {r['train_images_per_s']:.0f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
        d = pd["per_seed"][str(s)]
        lines.append(f"| {s} | **RPAT − PGD-AT (paired)** | " + " | ".join(cell(d.get(k), True) for k in METRICS)
                     + " | | | |")
    if len(pd["seeds"]) > 1:
        ms = pd["mean_sd"]
        lines.append("| all | **paired mean ± sd** | " + " | ".join(
            f"{ms[k]['mean']:+.2f} ± {ms[k]['sd']:.2f}" if k in ms else "-" for k in METRICS) + " | | | |")
    lines += [
        "",
        f"With {study['n_examples']:,} test images a single accuracy has a binomial standard error of up to "
        f"{50 / math.sqrt(study['n_examples']):.1f} points; a one-seed paired difference also carries the "
        "seed-to-seed variation of training, so differences of a point or two are not evidence either way.",
        "",
        f"The paper (Table 5, {PAPER['epochs']} epochs, 10,000 original test images): PGD-AT Clean "
        f"{PAPER['pgd_at']['clean']:.2f} / AA {PAPER['pgd_at']['aa']:.2f}, PGD-AT + RPAT "
        f"{PAPER['pgd_at_rpat']['clean']:.2f} / {PAPER['pgd_at_rpat']['aa']:.2f} (RPAT − PGD-AT: Clean "
        f"{PAPER['pgd_at_rpat']['clean'] - PAPER['pgd_at']['clean']:+.2f}, AA "
        f"{PAPER['pgd_at_rpat']['aa'] - PAPER['pgd_at']['aa']:+.2f}).",
    ]
    lines += _per_attack_lines(runs)
    path.write_text("\n".join(lines) + "\n")


# ---- main ---------------------------------------------------------------------------------------
def save(study: dict, out: Path) -> None:
    """Write ``study.json`` and ``study.md`` (called after the plan and after each evaluation, so that a
    run stopped by a time limit leaves what it finished)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    write_markdown(study, out / "study.md")


def run_study(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Data, probe, plan, the pairs and their evaluations; writes ``--out`` as it goes; returns the study."""
    from rpat.data import load_dataset
    from rpat.utils import git_commit, resolve_device

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    device = torch.device("cpu") if args.smoke else resolve_device(args.device)
    budget = args.minutes * 60.0
    keep = tempfile.mkdtemp(prefix="rpat-gpu-study-") if args.runs is None else None
    work = Path(keep) if keep else Path(args.runs)
    try:
        data = Path(args.data).expanduser()
        if data.is_file():
            log(f"extracting {data}")
            args.data_root = extract(data, work / "data", {"train": 8, "test": 8} if args.smoke else None)
        elif (data / "train").is_dir():
            args.data_root = data
        else:
            raise InputError(f"--data {str(data)!r} is neither the .tar.gz archive nor a folder with train/ and test/")
        train = load_dataset("imagefolder", args.data_root, "train", progress=False)
        test = load_dataset("imagefolder", args.data_root, "test", progress=False)
        t_data = time.perf_counter() - t_start
        train_subset = args.train_subset
        n_train = len(train) if train_subset is None else min(train_subset, len(train))
        log(f"data: {len(train):,} training, {len(test):,} test images ({t_data:.1f} s); device {device}")

        try:
            probe_out = probe(args, device, train, test, work, log)
        except Exception as e:  # a GPU window is too scarce to lose to a failed capture: retry eagerly
            if "speed.cuda_graph=true" not in speed_overrides(device):
                raise
            global GRAPH_OK
            GRAPH_OK = False
            log(f"probe with speed.cuda_graph=true failed ({type(e).__name__}: {e}); training eagerly instead")
            probe_out = probe(args, device, train, test, work, log)
            probe_out["graph_error"] = f"{type(e).__name__}: {e}"
        t_probe = time.perf_counter() - t_start - t_data
        eval_s = estimate_eval_seconds(args.n_examples, probe_out["eval"]["passes_per_s"])
        rates = [probe_out[m]["images_per_s"] for m in METHODS]
        plan = plan_study(budget, time.perf_counter() - t_start, n_train, rates,
                          max(probe_out[m]["epoch_overhead_seconds"] for m in METHODS),
                          max(probe_out[m]["setup_seconds"] for m in METHODS), eval_s, pairs=len(args.seeds),
                          max_epochs=1 if args.smoke else None)
        log(f"plan: {plan.epochs} epoch(s), {plan.schedule}; predicted {plan.predicted_seconds / 60:.2f} of "
            f"{args.minutes:.1f} min (evaluation estimate {eval_s:.0f} s per model)")

        runs: list[dict] = []
        skipped: list[int] = []
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"

        def snapshot(status: str) -> dict:
            used = time.perf_counter() - t_start
            return {
                "status": status, "command": "python studies/gpu_study.py " + " ".join(argv), "smoke": args.smoke,
                "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "git_commit": git_commit(),
                "device": {"type": device.type, "name": name}, "budget_minutes": args.minutes,
                "minutes_used": used / 60, "within_budget": used <= budget, "data_seconds": t_data,
                "probe_seconds": t_probe, "arch": args.arch, "batch_size": args.batch_size, "train_images": n_train,
                "n_examples": args.n_examples, "speed": speed_overrides(device), "probe": probe_out,
                "eval_estimate_seconds_per_model": eval_s, "plan": dataclasses.asdict(plan),
                "seeds": list(args.seeds), "skipped_seeds": skipped, "runs": runs,
                "paired": paired_differences(runs), "paper": PAPER,
            }

        save(snapshot("planned"), Path(args.out))
        for i, seed in enumerate(args.seeds):
            left = budget * 0.95 - (time.perf_counter() - t_start)
            per_pair = plan.fixed_seconds_per_pair + plan.epochs * plan.epoch_seconds_per_pair
            if i > 0 and left < per_pair:
                log(f"seed {seed}: skipped, {left:.0f} s left, a pair needs ~{per_pair:.0f} s")
                skipped.append(seed)
                continue
            pair = []
            for m in METHODS:
                cfg = make_config(args, m, seed, plan.epochs, plan.schedule, plan.milestones, device, train_subset)
                run_dir = work / "runs" / f"{m}_s{seed}"
                r = train_run(cfg, run_dir, train, test, log)
                pair.append((m, run_dir, r))
            for m, run_dir, r in pair:
                ev = evaluate_run(run_dir, args, device, log)
                runs.append({"method": m, "seed": seed, **ev,
                             "train_seconds": r["setup_seconds"] + r["fit_seconds"],
                             "train_images_per_s": statistics.fmean(row["train_images_per_s"] for row in r["rows"]),
                             "held_out_curve": [{"epoch": row["epoch"] + 1, "lr": row["train_lr"],
                                                 "clean": row["held_out_clean"], "pgd": row["held_out_pgd"]}
                                                for row in r["rows"]]})
                save(snapshot("running"), Path(args.out))
        study = snapshot("complete")
        save(study, Path(args.out))
        return study
    finally:
        if keep:
            shutil.rmtree(keep, ignore_errors=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz, or a folder holding train/ and test/")
    p.add_argument("--out", required=True, help="folder for study.md and study.json")
    p.add_argument("--minutes", type=float, default=None,
                   help="the whole budget (default 8; 30 with --smoke: tiny CPU rates, large estimates)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    p.add_argument("--smoke", action="store_true", help="the same code path on the CPU, tiny (CI)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", default=None, help="keep the runs (checkpoints) here (default: a temp dir, removed)")
    p.add_argument("--n-examples", type=int, default=None, help="test images evaluated (default 1000; 16 smoke)")
    p.add_argument("--probe-steps", type=int, default=None, help="steps per probe epoch (default 20; 2 smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.minutes = args.minutes if args.minutes is not None else (30.0 if smoke else 8.0)
    args.n_examples = args.n_examples if args.n_examples is not None else (16 if smoke else 1000)
    args.probe_steps = args.probe_steps if args.probe_steps is not None else (2 if smoke else 20)
    args.arch = "small_cnn" if smoke else "resnet18"
    args.batch_size = 16 if smoke else 128
    args.train_subset = 32 if smoke else None
    args.held_out = 8 if smoke else 500  # the trainer's per-epoch held-out PGD (best.pt; not used here)
    args.eval_batch = 500
    for name in ("minutes", "n_examples", "probe_steps"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        run_study(args, argv)
    except InputError as e:
        print(f"gpu_study: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
