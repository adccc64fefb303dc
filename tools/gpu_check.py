"""The prepared GPU check of ``speed.cuda_graph`` (issue 15): one command, at most ~9 minutes on one H100.

Parts (``--parts``, default all three, in this order; each writes its JSON as soon as it ends):

``tests``
    ``pytest tests/test_cuda_graph.py``: on CUDA this runs the GPU tests (the captured
    step equals the eager one in fp32 with TF32 off, for PGD-AT, TRADES, MART and
    Consistency-AT each with RPAT, and RPAT++; a resumed captured run equals an
    uninterrupted one) besides the CPU ones. ``--suite`` runs the whole suite instead.
``bench``
    ``benchmarks/train_step.py`` at batch 128, CIFAR size, PGD-10 + PGD-AT + RPAT:
    PreActResNet-18 and ResNet-18 with ``reference`` (release-style fp32), ``rpat`` (fp32),
    ``rpat+cl+bf16`` (eager), ``rpat+graph`` (fp32) and ``rpat+cl+bf16+graph``;
    WRN-34-10 with ``rpat``, ``rpat+cl+bf16``, ``rpat+cl+bf16+graph`` (MFU against
    the card's dense peak). -> ``OUT/cuda_<arch>_bs128.json``.
``train``
    The trainer end to end on the CIFAR-10 JPEGs (``--archive``, extracted to a temporary
    folder, or ``--data-root``): the ``cifar10_benchmark_rpat`` preset for 2 epochs with
    bf16 + channels_last + ``speed.cuda_graph=true``, for ResNet-18 and PreActResNet-18,
    and 1 eager epoch of ResNet-18 for comparison. The end-to-end figure of the last
    epoch (50,000 training images over the epoch's wall time, data and the held-out
    PGD-20 evaluation included) goes into the arch's benchmark JSON as
    ``trainer_images_per_s``, with the training loop alone as ``trainer_train_images_per_s``.

``multi`` (opt-in: ``--parts multi``, about 2 minutes)
    What ``rpat sweep --gpus 0,0`` pays once steps are captured: ``--procs`` (default 2)
    ``rpat train`` processes at once on the one GPU, 1 epoch each of the same captured
    ResNet-18 setting; their training-loop img/s summed, against one process alone.

Everything lands in ``--out`` (``gpu_check.json`` sums it up: device, torch, commit, each
part's result and seconds). Exit status 0 when every part passed.

``--cpu-tiny`` runs the same code path on the CPU in seconds (what CI runs): a few of the
tests, the benchmark on small_cnn at batch 8 with PGD-1 (the graph variants through the
eager stand-in), and 2 epochs of the trainer on 64 images with ``speed.cuda_graph=eager``.

On the GPU machine (see benchmarks/README.md)::

    bash ../shared/gpu/bundle.sh          # here, once: .gpu/ with the JPEG archive and pyautoattack
    # device command, with carry [".gpu"]:
    export PYTHONPATH=$PWD/.gpu/site:$PWD/src && python tools/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "train_step.py"

GPU_BENCH = [
    ("preact_resnet18", "reference,rpat,rpat+cl+bf16,rpat+graph,rpat+cl+bf16+graph", ["--reps", "8",
                                                                                      "--steps-per-rep", "5"]),
    ("resnet18", "reference,rpat,rpat+cl+bf16,rpat+graph,rpat+cl+bf16+graph", ["--reps", "8", "--steps-per-rep", "5"]),
    ("wrn34_10", "rpat,rpat+cl+bf16,rpat+cl+bf16+graph", ["--reps", "3", "--steps-per-rep", "3"]),
]
TINY_BENCH = [("small_cnn", "reference,rpat,rpat+cl+bf16,rpat+graph,rpat+cl+bf16+graph",
               ["--reps", "1", "--steps-per-rep", "1", "--warmup", "0", "--attack-steps", "1", "--threads", "1"])]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the equality tests
    return env


def _run(cmd: list[str], timeout: float, log_path: Path) -> tuple[int, float]:
    """Run ``cmd`` with its output teed to ``log_path``; (exit status, seconds). 124 on timeout."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def part_tests(out: Path, tiny: bool, suite: bool) -> dict[str, Any]:
    target = ["tests"] if suite else ["tests/test_cuda_graph.py"]
    extra = ["-k", "phase_key or warms_up"] if tiny else []
    rc, secs = _run([sys.executable, "-m", "pytest", "-q", "-rs", *target, *extra], 420 if suite else 240,
                    out / "tests.log")
    tail = (out / "tests.log").read_text().strip().splitlines()[-1:] or [""]
    return {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1), "summary": tail[0], "log": "tests.log"}


def part_bench(out: Path, tiny: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"ok": True, "files": [], "seconds": 0.0}
    for arch, variants, extra in TINY_BENCH if tiny else GPU_BENCH:
        dev, bs = ("cpu", "8") if tiny else ("cuda", "128")
        name = f"{dev}_{arch}_bs{bs}.json"
        cmd = [sys.executable, str(BENCH), "--device", dev, "--arch", arch, "--batch-size", bs,
               "--variants", variants, "--no-memory", "--out", str(out / name), *extra]
        rc, secs = _run(cmd, 60 if tiny else 200, out / f"bench_{arch}.log")
        res["seconds"] += round(secs, 1)
        res["ok"] &= rc == 0
        res[arch] = {"exit": rc, "seconds": round(secs, 1), "log": f"bench_{arch}.log"}
        if rc == 0:
            res["files"].append(name)
            data = json.loads((out / name).read_text())
            res[arch]["images_per_s"] = {r["variant"]: round(r["images_per_s"]["median"], 1) for r in data["results"]}
            res[arch]["mfu"] = {r["variant"]: round(r["mfu"], 3) for r in data["results"] if "mfu" in r}
    return res


def _data_root(args: argparse.Namespace, tmp: Path) -> Path:
    if args.data_root:
        return Path(args.data_root)
    archive = Path(args.archive)
    if not archive.is_file():
        raise SystemExit(f"gpu_check: no CIFAR-10 JPEG archive at {archive} (run bash ../shared/gpu/bundle.sh, "
                         "carry .gpu) and no --data-root")
    with tarfile.open(archive, "r:gz") as tf:
        try:
            tf.extractall(tmp, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(tmp)  # noqa: S202 - the project's own archive
    return tmp


def _train_one(cfg: Any, data: Any, run_dir: Path) -> dict[str, Any]:
    """Fit ``cfg`` on ``data``; per-epoch wall times (training, held-out evaluation, checkpoint saves)."""
    from rpat.training import Trainer

    t = Trainer(cfg, run_dir, data=data, progress=False, log=lambda m: None)
    starts: list[float] = []
    train_epoch = t.train_epoch

    def timed_epoch(epoch: int) -> dict[str, float]:
        starts.append(time.perf_counter())
        return train_epoch(epoch)

    t.train_epoch = timed_epoch  # an epoch's wall time: from its start to the next one's (eval and saves included)
    t.fit()
    bounds = [*starts, time.perf_counter()]
    walls = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    n = len(data.train)
    last = rows[-1]
    out = {"epochs": len(rows), "train_images": n, "epoch_wall_s": [round(w, 2) for w in walls],
           "trainer_images_per_s": round(n / walls[-1], 1),
           "trainer_train_images_per_s": round(last["train_images_per_s"], 1),
           "train_loop_s": round(last["train_seconds"], 2), "held_out_pgd": last["held_out_pgd"],
           "held_out_clean": last["held_out_clean"], "train_loss": last.get("train_loss")}
    g = t.graph_step
    if g is not None:
        c = g.captured
        out["graph"] = {"captures": c.n_captures, "replays": c.n_replays, "eager_warmup_steps": c.n_eager}
    return out


def part_train(out: Path, tiny: bool, args: argparse.Namespace) -> dict[str, Any]:
    from rpat.config import build_config
    from rpat.training import prepare_data

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rpat-gpu-check-") as tmpd:
        tmp = Path(tmpd)
        root = _data_root(args, tmp / "data")
        common = ["data.dataset=imagefolder", f"data.root={root}", "speed.amp=bf16", "speed.channels_last=true"]
        if tiny:
            common += ["data.train_subset=64", "data.batch_size=16", "eval.n_examples=16", "eval.steps=2",
                       "attack.steps=1", "device=cpu"]
        graph = "speed.cuda_graph=eager" if tiny else "speed.cuda_graph=true"
        archs = ["small_cnn"] if tiny else ["resnet18", "preact_resnet18"]
        t0 = time.perf_counter()
        base = build_config("cifar10_benchmark_rpat", None, [*common, f"model.arch={archs[0]}"])
        data = prepare_data(base, progress=False)
        res: dict[str, Any] = {"ok": True, "decode_s": round(time.perf_counter() - t0, 1), "runs": {}}
        runs = [(a, [*common, f"model.arch={a}", "optim.epochs=2", graph]) for a in archs]
        runs.append((f"{archs[0]}_eager", [*common, f"model.arch={archs[0]}", "optim.epochs=1",
                                           "speed.cuda_graph=false"]))
        for name, overrides in runs:
            cfg = build_config("cifar10_benchmark_rpat", None, overrides)
            try:
                res["runs"][name] = r = _train_one(cfg, data, tmp / "runs" / name)
            except Exception as e:  # noqa: BLE001 - reported, the other runs go on
                res["ok"] = False
                res["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            bench_file = out / f"{'cpu' if tiny else 'cuda'}_{name}_bs{8 if tiny else 128}.json"
            if bench_file.is_file() and not name.endswith("_eager"):  # the end-to-end figure joins the step's
                data_b = json.loads(bench_file.read_text())
                data_b["trainer_images_per_s"] = r["trainer_images_per_s"]
                shown = [o for o in overrides if not o.startswith("data.root=")]
                data_b["trainer"] = {"preset": "cifar10_benchmark_rpat", "overrides": shown, **r}
                bench_file.write_text(json.dumps(data_b, indent=2) + "\n")
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    return res


def part_multi(out: Path, tiny: bool, args: argparse.Namespace) -> dict[str, Any]:
    """1 process alone, then ``args.procs`` at once, each ``rpat train`` for 1 epoch with the graph on."""
    from rpat.config import build_config
    from rpat.training import prepare_data

    t_all = time.perf_counter()
    res: dict[str, Any] = {"ok": True}
    with tempfile.TemporaryDirectory(prefix="rpat-gpu-multi-") as tmpd:
        tmp = Path(tmpd)
        root = _data_root(args, tmp / "data")
        sets = ["data.dataset=imagefolder", f"data.root={root}", "speed.amp=bf16", "speed.channels_last=true",
                "optim.epochs=1", "eval.n_examples=100"]
        if tiny:
            sets += ["data.train_subset=64", "data.batch_size=16", "eval.n_examples=16", "eval.steps=2",
                     "attack.steps=1", "device=cpu", "model.arch=small_cnn", "speed.cuda_graph=eager"]
        else:
            sets += ["speed.cuda_graph=true"]
        prepare_data(build_config("cifar10_benchmark_rpat", None, sets), progress=False)  # decode once, cached
        for n in (1, args.procs):
            procs = []
            for k in range(n):
                cmd = [sys.executable, "-m", "rpat", "train", "--preset", "cifar10_benchmark_rpat",
                       "--run-dir", str(tmp / f"p{n}_{k}"), "--no-progress", *sets]
                log = open(out / f"multi_{n}_{k}.log", "w")  # noqa: SIM115 - closed below
                procs.append((subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
            rates = []
            for k, (proc, log) in enumerate(procs):
                rc = proc.wait(timeout=300)
                log.close()
                metrics = tmp / f"p{n}_{k}" / "metrics.jsonl"
                if rc != 0 or not metrics.is_file():
                    res["ok"] = False
                    continue
                rates.append(json.loads(metrics.read_text().splitlines()[-1])["train_images_per_s"])
            res[f"{n}_procs"] = {"train_images_per_s_each": [round(r, 1) for r in rates],
                                 "train_images_per_s_sum": round(sum(rates), 1)}
    one = res.get("1_procs", {}).get("train_images_per_s_sum")
    many = res.get(f"{args.procs}_procs", {}).get("train_images_per_s_sum")
    if one and many:
        res["gain"] = round(many / one, 2)
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON results and logs")
    p.add_argument("--parts", default="tests,bench,train", help="comma-separated: tests, bench, train, multi")
    p.add_argument("--procs", type=int, default=2, help="multi: training processes at once on the GPU")
    p.add_argument("--cpu-tiny", action="store_true", help="the same code path on the CPU in seconds (CI)")
    p.add_argument("--suite", action="store_true", help="tests: the whole suite, not only test_cuda_graph.py")
    p.add_argument("--archive", default=str(ROOT / ".gpu" / "cifar10-jpeg.tar.gz"),
                   help="the CIFAR-10 JPEG archive (default .gpu/cifar10-jpeg.tar.gz)")
    p.add_argument("--data-root", help="an extracted image folder (train/<class>, test/<class>) instead")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from rpat.utils import git_commit

    tiny = args.cpu_tiny
    if not tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu-tiny for the CPU run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "check": "gpu_check (issue 15)", "mode": "cpu-tiny" if tiny else "gpu",
        "device_name": torch.cuda.get_device_name(0) if not tiny else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "git_commit": git_commit(ROOT), "date": time.strftime("%Y-%m-%d %H:%M"),
        "parts": {}}
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    for part in parts:
        print(f"gpu_check: {part} ...", flush=True)
        if part == "tests":
            r = part_tests(out, tiny, args.suite)
        elif part == "bench":
            r = part_bench(out, tiny)
        elif part == "train":
            r = part_train(out, tiny, args)
        elif part == "multi":
            r = part_multi(out, tiny, args)
        else:
            print(f"gpu_check: unknown part {part!r}", file=sys.stderr)
            return 2
        summary["parts"][part] = r
        print(f"gpu_check: {part} {'ok' if r['ok'] else 'FAILED'}: {json.dumps(r)}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r["ok"] for r in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
