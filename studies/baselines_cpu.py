"""CPU evidence for issue 3: the four base methods, each with and without RPAT, through ``rpat sweep``.

One command reproduces the study (from the repository root, CIFAR-10 JPEGs in ``data/``)::

    OMP_NUM_THREADS=1 .venv/bin/python studies/baselines_cpu.py --data-root data \\
        --out runs/baselines_cpu/sweep --doc docs/baselines_cpu.md

Setting: small_cnn, a fixed 10,000-image subset of the CIFAR-10 JPEG training
images (``data.train_subset``), ℓ∞ ε = 8/255, a short constant-lr schedule (see
``--epochs``/``--attack-steps``), evaluation on the first 1,000 test images with
Clean, PGD-20 and AutoAttack (standard). The sweep skips finished runs, so an
interrupted study continues where it stopped when the command is run again.
The doc is written from the runs' files (results table, timings, RPAT − base deltas).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from rpat.experiments.sweep import collect_runs, run_sweep, run_workers
from rpat.objectives import method_label
from rpat.reports.sweep_table import gather, to_markdown
from rpat.run_dir import read_jsonl

METHODS = ("pgd_at", "trades", "mart", "consistency_at")
#: Points. The seed study on the same data and model (docs/results.md) measured an across-seed sd of
#: ≈1.7 AA points per method, ≈2.4 for a difference of two single-seed runs, and a paired RPAT − PGD-AT
#: sd of 3.7 points; a single-seed difference smaller than this is not evidence either way.
NOISE_PT = 3.5


def listing(args: argparse.Namespace) -> str:
    runs = "".join(f"  - {{name: {m}{'_rpat' if v == 'rpat' else ''}, preset: bench/cifar10/resnet18/linf/{m}/{v}}}\n"
                   for m in METHODS for v in ("base", "rpat"))
    ov = [
        "data.dataset=imagefolder", f"data.root={args.data_root}", "model.arch=small_cnn",
        f"data.train_subset={args.train_subset}", f"optim.epochs={args.epochs}", f"attack.steps={args.attack_steps}",
        f"attack.step_size={args.attack_step}", f"optim.lr={args.lr}", "optim.schedule=constant",
        f"eval.n_examples={args.held_out}", "device=cpu", "log_interval=1000", f"seed={args.seed}",
    ]
    return "runs:\n" + runs + "overrides:\n" + "".join(f"  - '{o}'\n" for o in ov)


def _pairs(rows: list[dict]) -> list[tuple[str, dict | None, dict | None]]:
    """``(method label, base row, RPAT row)`` per method; a row is None when that run is not in the table."""
    by = {r["method"]: r for r in rows}
    return [(method_label(m), by.get(method_label(m)), by.get(method_label(m, rpat=True))) for m in METHODS]


def _delta_lines(rows: list[dict]) -> list[str]:
    out = ["| method | ΔClean (final) | ΔPGD-20 (final) | ΔAA (final) | ΔNRR (final) |", "|---|---|---|---|---|"]
    for label, base, rp in _pairs(rows):
        if not base or not rp:
            continue
        cells = []
        for col in ("Clean (final)", "PGD-20 (final)", "AA (final)", "NRR (final)"):
            if base[col] is None or rp[col] is None:
                cells.append("–")
                continue
            d = rp[col] - base[col]
            cells.append(f"{d:+.2f}" + ("" if abs(d) > NOISE_PT else " (noise)"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _verdict(rows: list[dict]) -> list[str]:
    """One plain sentence per method: did RPAT move AA (final) beyond the noise band, and which way."""
    out = []
    for label, base, rp in _pairs(rows):
        if not base or not rp or base["Clean (final)"] is None or rp["Clean (final)"] is None:
            out.append(f"- {label}: not finished, no comparison.")
            continue
        if base["AA (final)"] is None or rp["AA (final)"] is None:
            out.append(f"- {label}: no AutoAttack result (run with --no-autoattack?), no AA comparison.")
            continue
        da, dc = rp["AA (final)"] - base["AA (final)"], rp["Clean (final)"] - base["Clean (final)"]
        if abs(da) <= NOISE_PT:
            word = "no measurable effect on AA"
        else:
            word = "RPAT helped AA" if da > 0 else "RPAT hurt AA"
        if abs(dc) > NOISE_PT:
            word += "; Clean " + ("higher" if dc > 0 else "lower") + " beyond the band"
        out.append(f"- {label}: {word} ({da:+.2f} AA, {dc:+.2f} Clean, final checkpoint).")
    return out


def _rpat_sizes(out: Path) -> list[str]:
    """Mean training loss terms of the last epoch of each RPAT run: how large λ·R was next to the base loss."""
    lines = ["| run | last-epoch train loss | of which RPAT term R (λ = 1) |", "|---|---|---|"]
    for m in METHODS:
        recs = read_jsonl(out / f"{m}_rpat" / "metrics.jsonl")
        last = recs[-1] if recs else {}
        if "train_rpat" in last:
            lines.append(f"| {m}_rpat | {last['train_loss']:.4f} | {last['train_rpat']:.2e} |")
    return lines


def _timings(out: Path) -> list[str]:
    lines = ["| run | train s/epoch (mean) | eval best s | eval final s |", "|---|---|---|---|"]
    for m in METHODS:
        for v in ("", "_rpat"):
            d = out / f"{m}{v}"
            recs = read_jsonl(d / "metrics.jsonl")
            if not recs:
                continue
            secs = sum(r["train_seconds"] for r in recs) / len(recs)
            ev = []
            for w in ("best", "final"):
                p = d / f"eval_{w}.json"
                res = json.loads(p.read_text()) if p.is_file() else {}
                ev.append("same weights as best" if res.get("same_weights_as") else
                          (f"{res['seconds']:.0f}" if "seconds" in res else "–"))
            lines.append(f"| {m}{v} | {secs:.0f} | {ev[0]} | {ev[1]} |")
    return lines


def write_doc(args: argparse.Namespace, rows: list[dict], wall: float | None, command: str) -> str:
    out = Path(args.out)
    return "\n".join([
        "# Baselines ± RPAT on CPU (small_cnn, CIFAR-10 JPEG 10k subset)",
        "",
        "Generated by `studies/baselines_cpu.py` from the run files in "
        f"`{out}` on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Setting",
        f"- Command: `{command}`",
        f"- Dataset: the CIFAR-10 JPEG copy (`data/`, dataset `imagefolder`), a fixed {args.train_subset}-image "
        "training subset (`data.train_subset`, the same images for every run); evaluation on the first "
        f"{args.n_examples} test images (class-mixed subset of the test folder).",
        "- Model: small_cnn; methods: PGD-AT, TRADES (β=6), MART (β=6), Consistency-AT (λ=1, T=0.5), each "
        "without and with RPAT (λ=1, a=0.5, logits proxy).",
        f"- Schedule: {args.epochs} epoch(s), SGD lr {args.lr} constant, momentum 0.9, wd 5e-4, batch 128, "
        f"crop+flip; training attack ℓ∞ ε=8/255, {args.attack_steps} steps of {args.attack_step}; `best` selected "
        f"by PGD-20 on {args.held_out} held-out test images after each epoch.",
        "- Evaluation: Clean, PGD-20 (ℓ∞ 8/255, step 2/255), AutoAttack standard (APGD-CE, APGD-T, FAB-T, "
        "Square), Mean = (Clean+AA)/2, NRR = 2·Clean·AA/(Clean+AA); all in percent.",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.jobs} worker process(es) of 1 thread "
        f"(`OMP_NUM_THREADS=1`), no GPU; torch {torch.__version__}."
        + ("" if wall is None else f" Wall time of this invocation: {wall / 60:.1f} min."),
        "",
        "## Results",
        "",
        to_markdown(rows),
        "## RPAT − base (final checkpoint, points)",
        "",
        f"Differences within ±{NOISE_PT} points are marked (noise). Each cell is one seed, and the seed study "
        "on the same data and model (`docs/results.md`) measured an across-seed sd of ≈1.7 AA points per method "
        "(≈2.4 for a difference of two runs) and a paired RPAT − PGD-AT sd of 3.7 points; the binomial "
        f"standard error of one accuracy at {args.n_examples} test images is ≤1.6 points.",
        "",
        *_delta_lines(rows),
        "",
        "In words (AA, final checkpoint, one seed; a difference inside the band is not evidence either way):",
        "",
        *_verdict(rows),
        "",
        "Size of the RPAT term during training (it is what RPAT adds to the gradient):",
        "",
        *_rpat_sizes(out),
        "",
        f"## Timings (seconds; {args.jobs} worker process(es) shared the machine's cores)",
        "",
        *_timings(out),
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/baselines_cpu/sweep")
    p.add_argument("--doc", default="docs/baselines_cpu.md")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--attack-step", default="2/255")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--held-out", type=int, default=200, help="held-out test images for best selection")
    p.add_argument("--n-examples", type=int, default=1000, help="test images of the final evaluation")
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (1 thread each); runs are dealt round-robin, so with 2 each base "
                        "method and its RPAT variant train side by side")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the doc from the runs finished so far (empty cells: not done)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "listing.yaml"
    spec.write_text(listing(args))
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.report_only:
        rows = gather([(r.name, r.cfg) for r in collect_runs([str(spec)])], out)
    elif args.jobs > 1:
        runs = collect_runs([str(spec)])
        run_workers([str(spec)], out, runs, [], args.n_examples, not args.no_autoattack,
                    {f"worker{k}": {"OMP_NUM_THREADS": "1"} for k in range(args.jobs)}, None, log)
        rows = gather([(r.name, r.cfg) for r in runs], out)
    else:
        rows = run_sweep([str(spec)], out, n_examples=args.n_examples, autoattack=not args.no_autoattack,
                         progress=False, log=log)
    command = "OMP_NUM_THREADS=1 .venv/bin/python studies/baselines_cpu.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("no_autoattack", "report_only")
    ) + (" --no-autoattack" if args.no_autoattack else "")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    record = out / "study.json"  # wall time of the last full invocation, so --report-only can restate it
    if args.report_only:
        wall = json.loads(record.read_text())["wall_s"] if record.is_file() else None
    else:
        wall = time.perf_counter() - t0
        record.write_text(json.dumps({"wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "jobs": args.jobs}))
    Path(args.doc).write_text(write_doc(args, rows, wall, command))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
