"""Time one adversarial training step of ``rpat`` against a release-style step, side by side.

One step = PGD-10 attack (ℓ∞ 8/255, step 2/255) + PGD-AT loss (+ RPAT by default)
+ backward + SGD update. Variants (``--variants``, comma-separated):

- ``rpat``: the project's step, the one the trainer runs (``rpat.training.TrainStep``):
  ``Objective.step`` (input-only gradients in the attack, each distinct input forwarded
  once), ``loss.backward()``, the non-finite guard, ``opt.step()``, the on-device loss
  sums, no host sync;
- ``reference``: the step the way the authors' release builds it
  (``benchmarks/reference_step.py``: ``loss.backward()`` in the attack,
  separate fp32 forwards, ``.item()`` each batch);
- ``rpat+cl``, ``rpat+bf16``, ``rpat+compile``, ``rpat+graph`` (and combinations
  such as ``rpat+cl+bf16+graph``): the project's step with channels_last memory
  format, bf16 autocast (fp32 master weights), ``torch.compile`` on the model, or
  the whole step captured once as a CUDA graph and replayed (``speed.cuda_graph``,
  ``rpat.training.cuda_graph``; on the CPU the eager stand-in runs the same step);
- ``rpat+awp`` (and e.g. ``rpat+bf16+awp``): the project's step with adversarial weight
  perturbation (``awp.enabled``, ``rpat.training.awp``; γ = 0.01, the proxy ascending the base
  loss): one more forward + backward on a proxy copy of the model per step.

Repetitions are interleaved (each repetition runs every variant once, in a
rotating order) so that load from other jobs on a shared machine hits all
variants alike; the report gives medians, the min-max spread, the ratio of the
medians against ``reference`` and the spread of the per-repetition ratios.
Before timing, the ``rpat`` and ``reference`` steps are checked to give the
same losses (to 1e-5) from the same weights, inputs and attack start; on CUDA
this check runs in strict fp32 (TF32 convolutions and matmuls off for the check
only: with TF32 the two steps differ by ~7e-4), the timing with torch's defaults.

Examples::

    # the headline CPU figure (2-core CPU, default torch threads)
    python benchmarks/train_step.py --arch preact_resnet18 --batch-size 32 \\
        --out benchmarks/results/cpu_preact_resnet18.json
    # the small CNN, with the optional speed-ups
    python benchmarks/train_step.py --arch small_cnn --batch-size 32 --reps 7 \\
        --variants rpat,reference,rpat+cl,rpat+bf16,rpat+compile
    # on a GPU: bf16 and channels_last, MFU against the card's peak
    python benchmarks/train_step.py --device cuda --batch-size 128 --variants rpat,reference,rpat+cl+bf16
    # the captured step (speed.cuda_graph) against the eager one and the release-style step
    python benchmarks/train_step.py --device cuda --batch-size 128 \
        --variants reference,rpat+cl+bf16,rpat+cl+bf16+graph

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` per variant; on the CPU,
each variant runs one step in a fresh subprocess and the report gives that
process's peak resident set size (``ru_maxrss``, includes the Python runtime
and the model) and its growth during the step. FLOPs are counted once per
variant with a dispatch-level counter (convolutions and matrix products,
forward and backward, 2 FLOPs per multiply-add); achieved TFLOP/s is that
count over the median step time, and MFU divides it by ``--peak-tflops``
(default: a table of known GPUs; none on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_step import reference_step  # noqa: E402

from rpat import __version__  # noqa: E402
from rpat.attacks.threat import ThreatModel, default_threat  # noqa: E402
from rpat.errors import InputError  # noqa: E402
from rpat.models import create_model  # noqa: E402
from rpat.objectives import RPATTerm, build_objective  # noqa: E402
from rpat.training import TrainStep  # noqa: E402
from rpat.training.awp import WeightPerturbation  # noqa: E402
from rpat.training.cuda_graph import GraphTrainStep  # noqa: E402
from rpat.utils import resolve_device  # noqa: E402

OPTIONS = ("cl", "bf16", "compile", "graph", "awp")

#: Dense peak TFLOP/s of known GPUs, by a substring of the device name: (bf16, tf32).
#: fp32 convolutions use TF32 tensor cores by default in PyTorch (cudnn.allow_tf32).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5), "4090": (165.2, 82.6),
}


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs (2 per multiply-add) of convolutions and matrix products, forward and backward.

    Works under ``torch.autograd.grad`` (``torch.utils.flop_counter.FlopCounterMode``
    installs module hooks that do not).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += int(count(*args, **kwargs, out_val=out))
        return out


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_variant(name: str) -> tuple[str, frozenset[str]]:
    """``"rpat+cl+bf16"`` -> ``("rpat", {"cl", "bf16"})``; ``"reference"`` takes no options."""
    base, *opts = name.strip().split("+")
    if base not in ("rpat", "reference"):
        raise InputError(f"unknown variant {name!r}; the base must be rpat or reference")
    bad = [o for o in opts if o not in OPTIONS]
    if bad or (base == "reference" and opts):
        raise InputError(f"unknown variant {name!r}; options (rpat only): {', '.join(OPTIONS)}")
    if {"graph", "compile"} <= set(opts):
        raise InputError(f"variant {name!r}: graph and compile exclude each other")
    if {"graph", "awp"} <= set(opts):
        raise InputError(f"variant {name!r}: awp does not run under the captured step (speed.cuda_graph)")
    return base, frozenset(opts)


@dataclass
class Problem:
    """One benchmark problem: the model, a fixed batch and the objective's settings.

    ``x``: ``(B, C, H, W)`` in [0, 1]; ``y``: ``(B,)``; ε and step in [0, 1] pixel units.
    """

    arch: str
    batch_size: int
    device: torch.device
    threat: ThreatModel
    rpat: RPATTerm | None
    image_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    seed: int = 0
    x: torch.Tensor = field(init=False)
    y: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch_size, self.in_chans, self.image_size, self.image_size)
        self.x = torch.rand(shape, generator=g).to(self.device)
        self.y = torch.randint(0, self.num_classes, (self.batch_size,), generator=g).to(self.device)

    def model(self) -> torch.nn.Module:
        """The same initial weights every call (seeded), in train mode, on the device."""
        torch.manual_seed(self.seed)
        return create_model(self.arch, num_classes=self.num_classes, in_chans=self.in_chans).to(self.device).train()


def make_step(problem: Problem, variant: str) -> Callable[[], object]:
    """A closure running one training step of ``variant`` on the problem's batch (own model and optimizer);
    it returns the step's loss (a device tensor, no host sync)."""
    base, opts = parse_variant(variant)
    dev = problem.device
    model = problem.model()
    x, y = problem.x, problem.y
    if "cl" in opts:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if base == "reference":
        gen = torch.Generator(device=dev).manual_seed(problem.seed + 2)
        return lambda: reference_step(model, opt, x, y, problem.threat, problem.rpat, gen)
    objective = build_objective("pgd_at", problem.threat, problem.rpat)
    net = torch.compile(model) if "compile" in opts else model
    kw = {"model": model, "step_model": net, "objective": objective, "optimizer": opt, "averager": None,
          "device": dev, "nonfinite": "stop", "amp": "bf16" in opts, "channels_last": "cl" in opts}
    if "graph" in opts:
        return _graph_step(GraphTrainStep(**kw, capture=dev.type == "cuda"), x, y, problem.seed + 2)
    # awp: AT-AWP's gamma 0.01, proxy lr 0.01, the proxy ascending the base loss (rpat.training.awp)
    awp = WeightPerturbation(model, objective, gamma=0.01, proxy_lr=0.01) if "awp" in opts else None
    ts = TrainStep(**kw, awp=awp)  # the trainer's step (guard, loss sums and all)
    ts.start_epoch(0, problem.seed + 2)

    def step() -> torch.Tensor:
        ts(x, y, 0)
        return ts.terms["loss"]

    return step


def _graph_step(gs: GraphTrainStep, x: torch.Tensor, y: torch.Tensor, seed: int) -> Callable[[], object]:
    """The trainer's step as ``speed.cuda_graph`` runs it (captured on CUDA, the eager stand-in on the CPU);
    warmed up and captured here, so the returned closure only replays (the batch is fixed)."""
    gs.start_epoch(0, seed, [0.01])
    for _ in range(gs.captured.warmup + 1):
        gs.step(x, y, 0, 0.01, key=0)

    def replay() -> torch.Tensor:
        gs.step(x, y, 0, 0.01, key=0)
        return gs.train_step.terms["loss"]

    return replay


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """TF32 off for CUDA convolutions and matrix products inside the block (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_same_losses(problem: Problem, tol: float = 1e-5) -> dict[str, float]:
    """Run one ``rpat`` and one ``reference`` step from identical weights, batch and attack start.

    Returns the absolute differences of each loss term and of the updated
    parameters (max over all entries); raises AssertionError above ``tol``.
    On CUDA both steps run in strict fp32 (TF32 off) for the check.
    """
    with strict_fp32(problem.device):
        return _check_same_losses(problem, tol)


def _check_same_losses(problem: Problem, tol: float) -> dict[str, float]:
    m1, m2 = problem.model(), problem.model()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g1 = torch.Generator(device=problem.device).manual_seed(problem.seed + 2)
    g2 = torch.Generator(device=problem.device).manual_seed(problem.seed + 2)
    objective = build_objective("pgd_at", problem.threat, problem.rpat)
    loss, terms = objective.step(m1, problem.x, problem.y, epoch=0, generator=g1)
    o1.zero_grad(set_to_none=True)
    loss.backward()
    o1.step()
    ref = reference_step(m2, o2, problem.x, problem.y, problem.threat, problem.rpat, g2)
    diffs = {f"abs_diff_{k}": abs(float(terms[k]) - v) for k, v in ref.items()}
    diffs["max_abs_diff_params"] = max(float((a - b).detach().abs().max()) for a, b in zip(
        m1.parameters(), m2.parameters(), strict=True))
    worst = max(v for k, v in diffs.items() if k.startswith("abs_diff_"))
    if worst > tol:
        raise AssertionError(f"rpat and reference steps disagree: {diffs}")
    return diffs


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (runs it once)."""
    with FlopCounter() as c:
        step()
    return c.flops


def memory_probe(problem_args: dict, variant: str) -> dict:
    """Peak memory of one step of ``variant``: CUDA allocator peak, or a fresh process's RSS (MiB)."""
    cmd = [sys.executable, __file__, "--_probe", variant, "--_problem", json.dumps(problem_args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _probe(problem: Problem, variant: str) -> dict:
    step = make_step(problem, variant)
    before = _rss_mib()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_rss_mib": round(peak, 1), "step_rss_growth_mib": round(peak - before, 1)}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_benchmark(
    problem: Problem,
    variants: list[str],
    reps: int = 5,
    steps_per_rep: int = 1,
    warmup: int = 1,
    memory: bool = True,
    flops: bool = True,
    peak_tflops: float | None = None,
    problem_args: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Check the losses agree, then time ``variants`` interleaved; returns the report (a JSON-able dict).

    Times are wall-clock seconds per step (device synchronized around each
    block of ``steps_per_rep`` steps); images/s is ``batch_size / seconds``.
    The process's CPU time per step is kept too: on a loaded machine it is
    less disturbed by other jobs than the wall clock.
    """
    for v in variants:
        parse_variant(v)
    dev = problem.device
    check = check_same_losses(problem) if {"rpat", "reference"} <= set(variants) else None
    steps = {v: make_step(problem, v) for v in variants}
    compile_s: dict[str, float] = {}
    for v, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(dev)
        compile_s[v] = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    peak_cuda: dict[str, float] = {v: 0.0 for v in variants}
    for r in range(reps):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps_per_rep):
                steps[v]()
            sync(dev)
            times[v].append((time.perf_counter() - t0) / steps_per_rep)
            cpu_times[v].append((time.process_time() - c0) / steps_per_rep)
            if dev.type == "cuda":
                peak_cuda[v] = max(peak_cuda[v], torch.cuda.max_memory_allocated(dev) / 2**20)
        log(f"rep {r + 1}/{reps}: " + "  ".join(f"{v} {times[v][-1] * 1000:.0f} ms" for v in variants))
    if peak_tflops is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak_tflops_pair = next((p for k, p in PEAK_TFLOPS.items() if k in name), None)
    else:
        peak_tflops_pair = (peak_tflops, peak_tflops) if peak_tflops else None
    results = []
    flop_counts: dict[str, int] = {}
    for v in variants:
        s = _stats(times[v])
        row: dict = {"variant": v, "ms_per_step": {k: x * 1000 for k, x in s.items()},
                     "images_per_s": {"median": problem.batch_size / s["median"],
                                      "min": problem.batch_size / s["max"],
                                      "max": problem.batch_size / s["min"]},
                     "times_s": times[v], "process_cpu_s": cpu_times[v], "warmup_s": compile_s[v]}
        if "reference" in variants and v != "reference":
            paired = [a / b for a, b in zip(times["reference"], times[v], strict=True)]
            row["speedup_vs_reference"] = {"of_medians": statistics.median(times["reference"]) / s["median"],
                                           "cpu_time_of_medians": statistics.median(cpu_times["reference"])
                                           / statistics.median(cpu_times[v]),
                                           **{f"paired_{k}": x for k, x in _stats(paired).items()}}
        if flops:
            base, opts = parse_variant(v)  # options but awp change no FLOP: counted once per base (+awp), eagerly
            counted = base + ("+awp" if "awp" in opts else "")
            if counted not in flop_counts:
                flop_counts[counted] = count_flops(make_step(problem, counted))
            fl = flop_counts[counted]
            row["gflop_per_step"] = fl / 1e9
            row["achieved_tflops"] = fl / s["median"] / 1e12
            if peak_tflops_pair:
                peak = peak_tflops_pair[0] if "bf16" in opts else peak_tflops_pair[1]
                row["mfu"] = row["achieved_tflops"] / peak
                row["mfu_peak_tflops"] = peak
        if dev.type == "cuda":
            row["peak_memory_mib"] = round(peak_cuda[v], 1)
            row["peak_memory_kind"] = "cuda_max_memory_allocated"
        elif memory and problem_args is not None:
            row.update(memory_probe(problem_args, v))
            row["peak_memory_kind"] = "fresh process ru_maxrss (one step)"
        results.append(row)
    return {"loss_check": check, "loss_check_precision": "strict fp32 (TF32 off)" if dev.type == "cuda" else "fp32",
            "results": results}


def _problem_from_args(a: dict) -> Problem:
    threat = default_threat("linf", steps=a["attack_steps"])
    rpat = None if a["no_rpat"] else RPATTerm()
    return Problem(a["arch"], a["batch_size"], resolve_device(a["device"]), threat, rpat,
                   image_size=a["image_size"], in_chans=a["in_chans"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="preact_resnet18", help="model name (default preact_resnet18)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32, help="square input side in pixels (default 32)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack (default 10)")
    p.add_argument("--no-rpat", action="store_true", help="plain PGD-AT (default: PGD-AT + RPAT)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--variants", default="rpat,reference",
                   help="comma-separated: rpat, reference, rpat+cl, rpat+bf16, rpat+compile, rpat+graph, rpat+awp, ... "
                        "(default rpat,reference)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--steps-per-rep", type=int, default=1, help="timed steps per variant per repetition")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (compiles)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs' bf16/tf32 dense peaks; none on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant CPU memory subprocesses")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    p.add_argument("--_problem", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        print(json.dumps(_probe(_problem_from_args(json.loads(args._problem)), args._probe)))
        return 0
    try:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in variants:
            parse_variant(v)
        if args.reps < 1 or args.steps_per_rep < 1 or args.warmup < 0:
            raise InputError("--reps and --steps-per-rep must be >= 1, --warmup >= 0")
        pa = {"arch": args.arch, "batch_size": args.batch_size, "device": args.device,
              "attack_steps": args.attack_steps, "no_rpat": args.no_rpat, "image_size": args.image_size,
              "in_chans": args.in_chans}
        problem = _problem_from_args(pa)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dev = problem.device
    report = run_benchmark(problem, variants, args.reps, args.steps_per_rep, args.warmup,
                           memory=not args.no_memory, flops=not args.no_flops,
                           peak_tflops=args.peak_tflops, problem_args=pa)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor()
                                                                                or platform.machine())
    out = {"benchmark": "train_step", "arch": args.arch, "batch_size": args.batch_size,
           "objective": "PGD-AT" + ("" if args.no_rpat else " + RPAT"),
           "attack": f"PGD-{args.attack_steps} linf 8/255 step 2/255", "device": str(dev),
           "device_name": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "rpat": __version__, "reps": args.reps, "steps_per_rep": args.steps_per_rep,
           "date": time.strftime("%Y-%m-%d %H:%M"), **report}
    if report["loss_check"]:
        worst = max(v for k, v in report["loss_check"].items() if k.startswith("abs_diff_"))
        strict = " in strict fp32 (TF32 off)" if dev.type == "cuda" else ""
        print(f"loss check: rpat and reference agree to {worst:.1e}{strict} (tolerance 1e-5)")
    print(f"{args.arch} bs={args.batch_size} {out['objective']} {out['attack']} on {dev} "
          f"({torch.get_num_threads()} threads), {args.reps} interleaved reps, median [min-max]:")
    for r in report["results"]:
        ms, ips = r["ms_per_step"], r["images_per_s"]
        line = (f"  {r['variant']:<18} {ips['median']:7.1f} img/s [{ips['min']:.1f}-{ips['max']:.1f}]  "
                f"{ms['median']:8.1f} ms/step")
        if "speedup_vs_reference" in r:
            s = r["speedup_vs_reference"]
            line += (f"  x{s['of_medians']:.2f} vs reference [paired {s['paired_min']:.2f}-{s['paired_max']:.2f}"
                     f", CPU time x{s['cpu_time_of_medians']:.2f}]")
        if "gflop_per_step" in r:
            line += f"  {r['gflop_per_step']:.0f} GFLOP {r['achieved_tflops'] * 1000:.0f} GFLOP/s"
        if "mfu" in r:
            line += f" MFU {r['mfu'] * 100:.1f}%"
        if "peak_memory_mib" in r:
            line += f"  peak {r['peak_memory_mib']:.0f} MiB"
        elif "peak_rss_mib" in r:
            line += f"  peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['step_rss_growth_mib']:.0f} in step)"
        print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
