"""Does the number of train-mode forward passes per step (BatchNorm running statistics) move accuracy?

rpat forwards each distinct input once per training step. The official TRADES code forwards x
twice in train mode (3 BatchNorm running-stat updates per step against rpat's 2), and the RPAT
release forwards x_adv twice. Losses and gradients are the same either way (a train-mode
BatchNorm normalizes with the batch's own statistics); only the running statistics, which the
eval-mode training attack and the evaluation use, differ. This study trains the same small
model with the same seed twice per method, once as rpat does and once with the published
code's extra forward (no_grad, train mode, after the loss's own passes: x for TRADES, x_adv
for PGD-AT + RPAT), and compares held-out Clean and PGD-20 accuracy of ``final.pt``::

    OMP_NUM_THREADS=1 python studies/bn_passes_cpu.py --data /work/shared/datasets/cifar10-jpeg.tar.gz \\
        --out runs/bn_passes --doc docs/bn_forwards.md --jobs 2

Setting: small_cnn (BatchNorm after every conv), a fixed 5,000-image subset of the CIFAR-10
JPEG training images, batch 128, SGD lr 0.05 constant, ℓ∞ 8/255 PGD-5 (step 2/255) training
attack, bf16 autocast, 4 epochs; evaluation of ``final.pt`` on 1,000 fixed test images (Clean,
PGD-20 ℓ∞ 8/255 step 2/255). With ``--doc`` the table replaces the block between
``<!-- bn_passes:begin -->`` and ``<!-- bn_passes:end -->`` in that file.

The two runs of a pair start from the same weights and see the same batches, but the eval-mode
training attack already differs after the first step, so the pair drifts apart like two seeds do;
``--seeds 0 1 2`` measures that spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: (method, rpat on, the published code's extra train-mode forward)
VARIANTS = {
    "trades": ("trades", False, "x"),
    "pgd_at_rpat": ("pgd_at", True, "x_adv"),
}
LABELS = {"trades": "TRADES", "pgd_at_rpat": "PGD-AT + RPAT"}
BEGIN, END = "<!-- bn_passes:begin -->", "<!-- bn_passes:end -->"


def add_extra_forward(trainer, which: str) -> None:
    """Make each training step also run ``model(x)`` or ``model(x_adv)`` in train mode under no_grad,
    after the loss's own passes, as the published code does; the loss and its gradient are unchanged."""
    import torch

    objective = trainer.objective
    loss = objective.loss

    def loss_with_extra_forward(model, x, y, x_adv, epoch):
        out = loss(model, x, y, x_adv, epoch)
        with torch.no_grad():
            model(x if which == "x" else x_adv)  # BatchNorm in train mode: one more running-stat update
        return out

    objective.loss = loss_with_extra_forward


def run_one(args: argparse.Namespace, variant: str, official: bool, seed: int) -> dict:
    import torch

    from rpat.config import build_config
    from rpat.evaluation.checkpoint_eval import evaluate_checkpoint
    from rpat.training import Trainer

    torch.set_num_threads(1)
    method, rpat, extra = VARIANTS[variant]
    name = f"{variant}_{'official' if official else 'rpat'}_s{seed}"
    run = Path(args.out) / name
    done = run / "result.json"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("doc", "jobs", "seeds", "data", "data_root")}
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return json.loads(done.read_text())  # finished by an earlier invocation with the same settings
    cfg = build_config(None, None, [
        "data.dataset=imagefolder", f"data.root={args.data_root}", f"data.train_subset={args.train_subset}",
        "model.arch=small_cnn", f"method.name={method}", f"rpat.enabled={str(rpat).lower()}",
        f"optim.epochs={args.epochs}", f"optim.lr={args.lr}", "optim.schedule=constant", f"attack.steps={args.steps}",
        "attack.step_size=2/255", f"eval.n_examples={args.held_out}", "speed.amp=bf16", "device=cpu",
        "log_interval=1000", f"seed={seed}",
    ])
    trainer = Trainer(cfg, run, overwrite=True, progress=False, log=lambda m: print(f"[{name}] {m}", flush=True))
    if official:
        add_extra_forward(trainer, extra)
    t0 = time.perf_counter()
    trainer.fit()
    t_train = time.perf_counter() - t0
    report, _ = evaluate_checkpoint(run / "final.pt", n_examples=args.n_examples, autoattack=False, device="cpu",
                                    progress=False)
    out = {"variant": variant, "official": official, "seed": seed, "clean": report.clean, "pgd": report.pgd,
           "train_seconds": t_train, "eval_seconds": report.seconds, "settings": settings}
    done.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[{name}] final: Clean {report.clean:.2f} PGD-20 {report.pgd:.2f}", flush=True)
    return out


def table(args: argparse.Namespace, results: list[dict], command: str, wall: float) -> str:
    by = {(r["variant"], r["official"], r["seed"]): r for r in results}
    lines = [
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.machine()} CPU, {args.jobs} "
        f"process(es) of 1 thread, {wall / 60:.1f} min): small_cnn, {args.train_subset:,} CIFAR-10 JPEG training "
        f"images, {args.epochs} epochs, lr {args.lr} constant, PGD-{args.steps} training attack, bf16; `final.pt` "
        f"on {args.n_examples:,} fixed test images.",
        "",
        "| method | seed | BN updates / step | Clean | PGD-20 | Δ Clean | Δ PGD-20 |",
        "|:--|--:|:--|--:|--:|--:|--:|",
    ]
    updates = {("trades", False): "2 (rpat: x, x_adv)", ("trades", True): "3 (official: x, x_adv, x)",
               ("pgd_at_rpat", False): "3 (rpat: x_adv, x, x_mid)",
               ("pgd_at_rpat", True): "4 (release: + x_adv again)"}
    for v in VARIANTS:
        for s in args.seeds:
            a, b = by.get((v, False, s)), by.get((v, True, s))
            if a is None or b is None:
                continue
            lines.append(f"| {LABELS[v]} | {s} | {updates[v, False]} | {a['clean']:.2f} | {a['pgd']:.2f} | | |")
            lines.append(f"| {LABELS[v]} | {s} | {updates[v, True]} | {b['clean']:.2f} | {b['pgd']:.2f} | "
                         f"{b['clean'] - a['clean']:+.2f} | {b['pgd'] - a['pgd']:+.2f} |")
    if len(args.seeds) > 1:
        lines += ["", "Over seeds (mean ± sd): Δ is the effect of the extra pass; the spread of the rpat-forward runs "
                  "across seeds is the noise it is measured against.", "",
                  "| method | Δ Clean | Δ PGD-20 | rpat-forward Clean across seeds | PGD-20 across seeds |",
                  "|:--|--:|--:|--:|--:|"]
        for v in VARIANTS:
            pairs = [(by[v, False, s], by[v, True, s]) for s in args.seeds
                     if (v, False, s) in by and (v, True, s) in by]
            if len(pairs) < 2:
                continue
            cells = [_ms([b[k] - a[k] for a, b in pairs], signed=True) for k in ("clean", "pgd")]
            cells += [_ms([a[k] for a, _ in pairs]) for k in ("clean", "pgd")]
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    se = 50 / args.n_examples ** 0.5
    lines += ["", f"Δ = published-code forwards − rpat forwards, in points; one accuracy on {args.n_examples:,} images "
              f"has a binomial standard error of up to {se:.1f} points."]
    return "\n".join(lines)


def _ms(values: list[float], signed: bool = False) -> str:
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return f"{mean:+.2f} ± {sd:.2f}" if signed else f"{mean:.2f} ± {sd:.2f}"


def write_doc(path: Path, text: str) -> None:
    """Replace the block between the markers in ``path`` (append one when absent)."""
    block = f"{BEGIN}\n{text}\n{END}"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz, or a folder holding train/ and test/")
    p.add_argument("--out", default="runs/bn_passes", help="where the runs go")
    p.add_argument("--doc", default=None, help="write the table into this markdown file, between the markers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="training attack steps (step 2/255)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--held-out", type=int, default=200, help="test images of the trainer's per-epoch check")
    p.add_argument("--n-examples", type=int, default=1000, help="test images of the final evaluation")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side (one process, one thread each)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = Path(args.data).expanduser()
    with tempfile.TemporaryDirectory(prefix="rpat-bn-") as tmp:
        if data.is_file():
            with tarfile.open(data, "r:gz") as tf:
                tf.extractall(tmp, filter="data")
            args.data_root = next(q.parent for q in Path(tmp).rglob("train") if (q.parent / "test").is_dir())
        else:
            args.data_root = data
        from rpat.data import load_dataset

        for split in ("train", "test"):  # decode once into the cache, before the workers start
            load_dataset("imagefolder", args.data_root, split, progress=False)
        todo = [(v, off, s) for s in args.seeds for v in VARIANTS for off in (False, True)]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as ex:
                results = list(ex.map(run_one, [args] * len(todo), *zip(*todo, strict=True)))
        else:
            results = [run_one(args, *t) for t in todo]
    command = "OMP_NUM_THREADS=1 python studies/bn_passes_cpu.py " + " ".join(argv)
    text = table(args, results, command, time.perf_counter() - t0)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), text)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
