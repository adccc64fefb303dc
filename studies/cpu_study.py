"""Does RPAT beat PGD-AT on real CIFAR-10 at CPU scale? Several seeds, error bars, paired per seed.

    python studies/cpu_study.py --data-root data --out runs/cpu_study --jobs 2

trains the small CNN with PGD-AT and with PGD-AT + RPAT (λ = 1, a = 0.5, logits)
on a fixed subset of the CIFAR-10 training images (an image folder such as the
JPEG copy), for every seed, evaluates each ``final.pt`` on a fixed set of test
images with Clean, PGD-20 and AutoAttack (standard), and writes

    <out>/<method>_s<seed>/        the runs (config, metrics.jsonl, checkpoints, eval_final.json)
    <docs>/cpu_study.json          every number, per run and aggregated
    <docs>/cpu_study.md            mean ± std table, paired differences per seed
    <docs>/cpu_study.png|.pdf      the accuracy-robustness plane (Clean vs AA)

The schedule is the paper's benchmark schedule scaled down: ``--epochs`` epochs
with the learning rate ×0.1 at ``--milestones``. Runs already finished are
skipped and interrupted ones resumed, so the command can be re-run after a crash.
Each worker uses one CPU thread; ``--jobs 2`` runs two trainings side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = {"pgd_at": "PGD-AT", "pgd_at_rpat": "PGD-AT + RPAT"}
METRICS = ("clean", "pgd", "aa", "mean", "nrr")
LABELS = {"clean": "Clean", "pgd": "PGD-20", "aa": "AA", "mean": "Mean", "nrr": "NRR"}


def _overrides(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    o = [
        "data.dataset=imagefolder", f"data.root={args.data_root}", f"data.train_subset={args.train_subset}",
        f"data.batch_size={args.batch_size}", f"model.arch={args.arch}", "method.name=pgd_at",
        f"rpat.enabled={'true' if method == 'pgd_at_rpat' else 'false'}", "rpat.lam=1.0", "rpat.alpha=0.5",
        "rpat.proxy=logits", f"optim.epochs={args.epochs}", f"optim.lr={args.lr}",
        f"optim.milestones={json.dumps(args.milestones)}", f"eval.n_examples={args.held_out}",
        f"seed={seed}", "device=cpu", f"save_every={1 if seed == args.seeds[0] else 0}",
    ]
    return o


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict:
    """Train (or resume, or skip) one run and evaluate its final checkpoint; returns its results."""
    import torch

    from rpat.config import build_config
    from rpat.evaluation.checkpoint_eval import evaluate_checkpoint
    from rpat.run_dir import read_jsonl
    from rpat.training import Trainer

    torch.set_num_threads(args.threads)
    run = Path(args.out) / f"{method}_s{seed}"
    result_file = run / "eval_final.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    t0 = time.perf_counter()
    if not (run / "final.pt").is_file():
        cfg = build_config(None, None, _overrides(args, method, seed))
        resume = (run / "last.pt").is_file()
        Trainer(cfg, run, resume=resume, progress=False, log=lambda m: print(f"[{run.name}] {m}", flush=True)).fit()
    t_train = time.perf_counter() - t0
    report, info = evaluate_checkpoint(run / "final.pt", n_examples=args.n_examples, progress=False,
                                       device="cpu", seed=0)
    rows = read_jsonl(run / "metrics.jsonl")
    out = {"method": method, "seed": seed, **report.to_dict(), "info": info,
           "train_seconds": t_train, "eval_seconds": time.perf_counter() - t0 - t_train,
           "train_images_per_s": statistics.fmean(r["train_images_per_s"] for r in rows),
           "held_out_curve": [{"epoch": r["epoch"] + 1, "clean": r["held_out_clean"], "pgd": r["held_out_pgd"]}
                              for r in rows]}
    result_file.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[{run.name}] final: " + " ".join(f"{LABELS[k]} {out[k]:.2f}" for k in METRICS if out.get(k) is not None),
          flush=True)
    return out


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(args: argparse.Namespace, results: list[dict]) -> dict:
    by = {m: {r["seed"]: r for r in results if r["method"] == m} for m in METHODS}
    agg = {m: {k: _ms([by[m][s][k] for s in sorted(by[m])]) for k in METRICS} for m in METHODS}
    seeds = sorted(set(by["pgd_at"]) & set(by["pgd_at_rpat"]))
    paired = {s: {k: by["pgd_at_rpat"][s][k] - by["pgd_at"][s][k] for k in METRICS} for s in seeds}
    diff = {k: _ms([paired[s][k] for s in seeds]) for k in METRICS}
    return {"aggregate": agg, "paired": paired, "paired_mean_std": diff, "seeds": seeds}


def write_markdown(args: argparse.Namespace, summary: dict, results: list[dict], path: Path, cmd: str) -> None:
    agg, diff = summary["aggregate"], summary["paired_mean_std"]
    r0 = results[0]
    lines = [
        "# CPU study: PGD-AT vs PGD-AT + RPAT on the CIFAR-10 JPEG copy",
        "",
        f"Command: `{cmd}`",
        "",
        f"- Data: CIFAR-10 JPEG copy (`../shared/datasets/cifar10-jpeg.tar.gz`), a fixed {args.train_subset}-image "
        f"training subset (the same for every seed); evaluation on {r0['n_examples']} fixed test images "
        "(a class-mixed subset fixed by seed 0).",
        f"- Model {args.arch}; batch {args.batch_size}; SGD lr {args.lr}, momentum 0.9, wd 5e-4; {args.epochs} "
        f"epochs, lr ×0.1 at epochs {args.milestones} (0-based); ℓ∞ ε = 8/255, PGD-10 step 2/255 for training; "
        "RPAT λ = 1, a = 0.5, logits.",
        f"- Evaluation of `final.pt`: {r0['threat']}; AutoAttack standard (pyautoattack). Seeds {summary['seeds']}.",
        f"- Machine: {platform.machine()} CPU, {args.threads} thread(s) per run, {args.jobs} run(s) at a time, "
        f"no GPU; torch {r0['info']['torch']}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| method | " + " | ".join(LABELS[k] for k in METRICS) + " |",
        "|:--|" + "--:|" * len(METRICS),
    ]
    for m, name in METHODS.items():
        lines.append(f"| {name} | " + " | ".join(f"{agg[m][k][0]:.2f} ± {agg[m][k][1]:.2f}" for k in METRICS) + " |")
    lines.append("| RPAT − PGD-AT (paired) | " + " | ".join(f"{diff[k][0]:+.2f} ± {diff[k][1]:.2f}" for k in METRICS)
                 + " |")
    lines += ["", "Mean ± sample standard deviation over seeds. Per seed:", "",
              "| seed | method | " + " | ".join(LABELS[k] for k in METRICS) + " | train img/s |",
              "|--:|:--|" + "--:|" * (len(METRICS) + 1)]
    for r in sorted(results, key=lambda r: (r["seed"], r["method"])):
        lines.append(f"| {r['seed']} | {METHODS[r['method']]} | " + " | ".join(f"{r[k]:.2f}" for k in METRICS)
                     + f" | {r['train_images_per_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def write_figure(summary: dict, results: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    style = {"pgd_at": dict(marker="o", color="0.55", label="PGD-AT"),
             "pgd_at_rpat": dict(marker="s", color="0.05", label="PGD-AT + RPAT")}
    for m, st in style.items():
        pts = [(r["clean"], r["aa"]) for r in results if r["method"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, facecolors="none", edgecolors=st["color"],
                   marker=st["marker"])
        (cm, cs), (am, as_) = summary["aggregate"][m]["clean"], summary["aggregate"][m]["aa"]
        ax.errorbar([cm], [am], xerr=[0 if math.isnan(cs) else cs], yerr=[0 if math.isnan(as_) else as_],
                    marker=st["marker"], color=st["color"], ms=8, capsize=3, label=st["label"] + " (mean ± sd)")
    for s in summary["seeds"]:
        a = next(r for r in results if r["method"] == "pgd_at" and r["seed"] == s)
        b = next(r for r in results if r["method"] == "pgd_at_rpat" and r["seed"] == s)
        ax.annotate("", xy=(b["clean"], b["aa"]), xytext=(a["clean"], a["aa"]),
                    arrowprops=dict(arrowstyle="->", color="0.3", lw=0.8, linestyle="--"))
    ax.set_xlabel("Clean accuracy (%)")
    ax.set_ylabel("AutoAttack accuracy (%)")
    ax.set_title("CIFAR-10 (JPEG) subset, small CNN, CPU", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix("." + ext), dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="image-folder root holding train/ and test/")
    p.add_argument("--out", default="runs/cpu_study", help="where the runs go")
    p.add_argument("--docs", default="docs/results", help="where the table, JSON and figure go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--milestones", type=int, nargs="*", default=[3])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--held-out", type=int, default=500, help="test images for the per-epoch held-out PGD")
    p.add_argument("--n-examples", type=int, default=1000, help="test images for the final evaluation")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    args = p.parse_args(argv)
    cmd = "python studies/cpu_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    todo = [(m, s) for s in args.seeds for m in METHODS]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            results = list(ex.map(run_one, [args] * len(todo), *zip(*todo, strict=True)))
    else:
        results = [run_one(args, m, s) for m, s in todo]
    summary = summarize(args, results)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "cpu_study.json").write_text(json.dumps({"command": cmd, "args": vars(args), **summary,
                                                     "runs": results}, indent=2) + "\n")
    write_markdown(args, summary, results, docs / "cpu_study.md", cmd)
    write_figure(summary, results, docs / "cpu_study")
    print((docs / "cpu_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
