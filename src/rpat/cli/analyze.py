"""``rpat analyze`` (consistency, smoothness), ``rpat ablation`` (the λ × a grid) and ``rpat report``
(tables and figures from run directories)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..analysis.consistency import check_proxies, consistency_of_checkpoint, consistency_of_run, write_json
from ..analysis.smoothness import smoothness_of_checkpoint, smoothness_table
from ..errors import InputError
from ..experiments.ablation import ablation_grid, parse_grid, run_ablation, write_ablation
from ..reports import build_report
from ..reports.figures import consistency_figure, smoothness_figure

EXAMPLES_ANALYZE = """\
examples:
  rpat analyze consistency runs/pgdat                 # every epochs/epoch_NNNN.pt + final.pt of a run
  rpat analyze consistency runs/pgdat/final.pt --n-examples 1000 --proxy logits second_to_last
  rpat analyze consistency runs/pgdat runs/pgdat_rpat --trend-examples 200 --out docs/analysis
  rpat analyze smoothness runs/pgdat/final.pt runs/pgdat_rpat/final.pt --labels PGD-AT "PGD-AT + RPAT"
  rpat analyze smoothness runs/pgdat/final.pt --n-points 50 --proxy second_to_last --alphas 0.5,1

consistency: PGD-20 (the checkpoint's threat model) on held-out test images, split into
defended / failed, per-group mean, std, median, count of MSE(h(x),h(x_adv)),
MSE(h(x),h(x_mid)), MSE(h(x_mid),h(x_adv)), x_mid = x + delta/2. Writes JSON + figure.
smoothness: curvature along delta (second difference x4 and the HVP form), Jacobian drift
||J(x+a delta) - J(x)||_F, spectral norm ||J(x)||_2, Lipschitz estimate sup||J|| + gamma.
"""

EXAMPLES_ABLATION = """\
examples:
  rpat ablation --preset cifar10_benchmark --method pgd_at --lam 0.5,1,2 --alpha 0.25,0.5,0.75 --out abl
  rpat ablation --base-config my.yaml --method pgd_at --lam 1 --alpha 0.3,0.5,0.7 --out abl --run
  rpat ablation --preset digits_demo --lam 0.5,1 --alpha 0.5 --out abl optim.epochs=5 --run

writes <out>/configs/<name>.yaml (one resolved config per grid point, plus the base method
without RPAT unless --no-baseline), <out>/ablation.json and <out>/sweep.yaml, a listing for
  rpat sweep <out>/sweep.yaml --out <out>/runs        (trains, evaluates, writes results.md)
--run instead trains them here one after the other into <out>/runs/<name> (finished runs
skipped, interrupted ones resumed, no evaluation). Then:
  rpat report <out>/runs --out <out>/report
"""

EXAMPLES_REPORT = """\
examples:
  rpat report runs/pgdat runs/pgdat_rpat --out reports/main
  rpat report runs/cpu_study --out reports/cpu --which final --consistency docs/analysis/consistency_pgd_at.json
  rpat report abl/runs --out abl/report --formats png

reads each run's config.yaml, metrics.jsonl and eval JSON (eval_best.json / eval_final.json from
`rpat train --eval`, or best.eval.json / final.eval.json from `rpat eval`; without them, the held-out
log: Clean and PGD-20 only), and writes table.md / table.csv / table.tex (each accuracy ± its
standard error; a column's best in bold only when it beats the next by more than 2·sqrt(SE1² + SE2²);
runs that differ only in the seed as one row, mean ± sd), plane.png/.pdf (Clean vs AA, arrows
baseline -> RPAT, ±1 SE error bars), curves.png/.pdf (training curves).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``analyze``, ``ablation`` and ``report`` on the main parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    a = sub.add_parser("analyze", help="perception consistency and smoothness analyses of checkpoints",
                       description="Analyses of trained checkpoints (the paper's Figures 2/5 and Theorems 1/2).",
                       epilog=EXAMPLES_ANALYZE, formatter_class=fmt)
    asub = a.add_subparsers(dest="analysis", metavar="ANALYSIS")
    c = asub.add_parser("consistency", help="MSE of perception between x, x_mid, x_adv: defended vs failed",
                        epilog=EXAMPLES_ANALYZE, formatter_class=fmt)
    c.add_argument("targets", nargs="+", metavar="RUN_OR_CHECKPOINT",
                   help="run directories (their epochs/epoch_NNNN.pt and final.pt) or checkpoint files")
    c.add_argument("--n-examples", type=int, default=500, help="held-out test images (default 500)")
    c.add_argument("--trend-examples", type=int, help="images per epoch checkpoint (default --n-examples)")
    c.add_argument("--proxy", nargs="+", default=["logits"],
                   help="logits, second_to_last, third_to_last (default logits)")
    c.add_argument("--out", help="output folder (default: <run>/analysis, or next to the checkpoint)")
    c.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    c.add_argument("--batch-size", type=int, default=250)
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0, help="seeds the PGD random start")
    c.add_argument("--no-figure", action="store_true")
    c.add_argument("--figure-dir", help="where figures go (default: with the JSON)")
    c.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")
    s = asub.add_parser("smoothness", help="curvature, Jacobian drift, spectral norm, Lipschitz estimate",
                        epilog=EXAMPLES_ANALYZE, formatter_class=fmt)
    s.add_argument("checkpoints", nargs="+", help="checkpoints, compared side by side")
    s.add_argument("--labels", nargs="+", help="one label per checkpoint")
    s.add_argument("--n-points", type=int, default=100, help="held-out test images (default 100)")
    s.add_argument("--proxy", default="logits", help="logits, second_to_last, third_to_last")
    s.add_argument("--alphas", default="0.25,0.5,0.75,1", help="rates a of the drift (default 0.25,0.5,0.75,1)")
    s.add_argument("--power-iters", type=int, default=30, help="power iterations for ||J||_2 (default 30)")
    s.add_argument("--float32", action="store_true", help="measure in float32 (default float64)")
    s.add_argument("--out", default="analysis", help="output folder (default analysis)")
    s.add_argument("--name", default="smoothness", help="file name stem (default smoothness)")
    s.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-figure", action="store_true")
    s.add_argument("--figure-dir", help="where the figure goes (default: --out)")
    s.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")

    b = sub.add_parser("ablation", help="λ × a grid of RPAT runs on a base method (Section 5.4)",
                       description="Generate (and optionally train) one config per (λ, a) grid point.",
                       epilog=EXAMPLES_ABLATION, formatter_class=fmt)
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    b.add_argument("--method", default="pgd_at", help="base method (default pgd_at)")
    b.add_argument("--lam", default="0.5,1,2", help="λ values, comma-separated (default 0.5,1,2)")
    b.add_argument("--alpha", default="0.25,0.5,0.75", help="a values, comma-separated (default 0.25,0.5,0.75)")
    b.add_argument("--preset", help="a built-in config (see `rpat list presets`)")
    b.add_argument("--base-config", help="a YAML config file all runs start from")
    b.add_argument("--no-baseline", action="store_true", help="no run of the base method without RPAT")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--run", action="store_true", help="train the runs one after the other")
    b.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="tables (md, csv, LaTeX) and figures from many run directories",
                       description="Gather run results into Table 1/5/6-style tables and figures.",
                       epilog=EXAMPLES_REPORT, formatter_class=fmt)
    r.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--labels", nargs="+", help="one row label per run (default: method [+ RPAT])")
    r.add_argument("--which", default="best,final", help="checkpoints as columns: best,final (default both)")
    r.add_argument("--consistency", nargs="+", default=[], help="consistency JSON files to plot")
    r.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")
    r.add_argument("--no-figures", action="store_true")


def _print_consistency(name: str, res: dict) -> None:
    print(f"{name}: epoch {res.get('epoch')}, {res['n_examples']} images, {res['threat']}, "
          f"clean {res['clean_accuracy']:.2f}%, robust {res['robust_accuracy']:.2f}%")
    for p in res["proxies"]:
        print(f"  proxy {p}: group (count) mean [median] of clean_adv | clean_mid | mid_adv")
        for g in ("defended", "failed"):
            st = res["stats"][p][g]
            cells = " | ".join("-" if st[m]["mean"] is None else f"{st[m]['mean']:.4g} [{st[m]['median']:.4g}]"
                               for m in ("clean_adv", "clean_mid", "mid_adv"))
            print(f"    {g:9s} ({st['clean_adv']['count']}): {cells}")


def _formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if not formats or any(f not in ("png", "pdf", "svg") for f in formats):
        raise InputError(f"--formats must be among png, pdf, svg; got {text!r}")
    return formats


def _figure_stem(args: argparse.Namespace, stem: Path) -> Path:
    return Path(args.figure_dir) / stem.name if args.figure_dir else stem


def run_consistency(args: argparse.Namespace) -> int:
    proxies = check_proxies(args.proxy)
    formats = _formats(args.formats)
    for n, what in ((args.n_examples, "--n-examples"), (args.trend_examples, "--trend-examples")):
        if n is not None and n < 1:
            raise InputError(f"{what} must be >= 1, got {n}")
    kw = dict(proxies=proxies, batch_size=args.batch_size, device=args.device, seed=args.seed,
              data_root=args.data_root)
    for t in map(Path, args.targets):
        if t.is_dir():
            res = consistency_of_run(t, n_examples=args.n_examples, trend_examples=args.trend_examples,
                                     log=lambda m: print(m, file=sys.stderr), **kw)
            out = Path(args.out) if args.out else t / "analysis"
            stem = out / (f"consistency_{t.name}" if args.out else "consistency")
            if "final" in res:
                _print_consistency(f"{t.name} final", res["final"])
        elif t.is_file():
            res = consistency_of_checkpoint(t, n_examples=args.n_examples, **kw)
            out = Path(args.out) if args.out else t.parent
            stem = out / f"consistency_{t.parent.name}_{t.stem}"
            _print_consistency(str(t), res)
        else:
            raise InputError(f"{str(t)!r} is neither a run directory nor a checkpoint file")
        written = [write_json(res, stem.with_suffix(".json"))]
        if not args.no_figure:
            written += consistency_figure(res, _figure_stem(args, stem), title=str(t), formats=formats)
        print("wrote " + ", ".join(map(str, written)))
    return 0


def run_smoothness(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.checkpoints):
        raise InputError(f"got {len(args.labels)} labels for {len(args.checkpoints)} checkpoints")
    if args.n_points < 1 or args.power_iters < 1:
        raise InputError("--n-points and --power-iters must be >= 1")
    alphas = parse_grid(args.alphas, "alphas")
    if not all(0 < a <= 1 for a in alphas):
        raise InputError(f"--alphas must be in (0, 1], got {args.alphas!r}")
    dtype = torch.float32 if args.float32 else torch.float64
    formats = _formats(args.formats)
    results = []
    for i, ck in enumerate(args.checkpoints):
        label = args.labels[i] if args.labels else None
        results.append(smoothness_of_checkpoint(ck, n_points=args.n_points, proxy=args.proxy, alphas=alphas,
                                                power_iters=args.power_iters, seed=args.seed, dtype=dtype,
                                                data_root=args.data_root, label=label))
        print(f"{results[-1]['label']}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(smoothness_table(results))
    stem = Path(args.out) / args.name
    written = [write_json({"results": results}, stem.with_suffix(".json"))]
    if not args.no_figure:
        written += smoothness_figure(results, _figure_stem(args, stem), formats=formats)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    if args.analysis == "consistency":
        return run_consistency(args)
    if args.analysis == "smoothness":
        return run_smoothness(args)
    raise InputError("name an analysis: rpat analyze consistency ... or rpat analyze smoothness ...")


def run_ablation_cmd(args: argparse.Namespace) -> int:
    grid = ablation_grid(args.method, parse_grid(args.lam, "lam"), parse_grid(args.alpha, "alpha"),
                         preset=args.preset, base_config=args.base_config, overrides=args.overrides,
                         baseline=not args.no_baseline)
    manifest = write_ablation(args.out, grid)
    print(f"wrote {len(grid)} configs to {Path(args.out) / 'configs'} and {manifest}")
    if args.run:
        run_ablation(manifest, progress=not args.no_progress)
        print(f"done; tabulate with: rpat report {Path(args.out) / 'runs'} --out {Path(args.out) / 'report'}")
    else:
        print(f"train and evaluate them with: rpat sweep {Path(args.out) / 'sweep.yaml'} --out "
              f"{Path(args.out) / 'runs'} (or add --run here to train them one after the other)")
    return 0


def run_report(args: argparse.Namespace) -> int:
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    formats = _formats(args.formats)
    written = build_report(args.runs, args.out, labels=args.labels, which=which, consistency=args.consistency,
                           formats=formats, figures=not args.no_figures)
    print((Path(args.out) / "table.md").read_text(), end="")
    print("wrote " + ", ".join(map(str, written)))
    return 0
