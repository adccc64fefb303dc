"""Time one adversarial training step: PGD-10 attack + PGD-AT loss, with and without RPAT.

    python benchmarks/train_step.py --arch preact_resnet18 --batch-size 32 --device cpu \
        --out benchmarks/results/cpu_preact_resnet18.json

Reports images/s (training images through attack + update per second), the
time of one step, and peak memory: torch.cuda.max_memory_allocated on a GPU,
the process's peak resident set size on the CPU (an upper bound that includes
the Python runtime).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from rpat import __version__
from rpat.attacks.threat import default_threat
from rpat.models import create_model
from rpat.objectives import RPATTerm, build_objective
from rpat.utils import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(arch: str, batch_size: int, device: torch.device, rpat: bool, steps: int, warmup: int,
              image_size: int = 32, num_classes: int = 10) -> dict:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    objective = build_objective("pgd_at", default_threat("linf", steps=10), RPATTerm() if rpat else None)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def one() -> torch.Tensor:
        loss, _ = objective.step(model, x, y, epoch=0, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        one()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_kind = "cuda_max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "process_peak_rss"
    return {"rpat": rpat, "seconds_per_step": dt, "images_per_s": batch_size / dt,
            "peak_memory_mib": round(peak, 1), "peak_memory_kind": peak_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="preact_resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = [time_step(args.arch, args.batch_size, device, rpat, args.steps, args.warmup)
               for rpat in (False, True)]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    out = {"benchmark": "train_step", "arch": args.arch, "batch_size": args.batch_size,
           "attack": "PGD-10 linf 8/255", "device": str(device),
           "device_name": device_name,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rpat": __version__,
           "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "results": results}
    for r in results:
        name = "PGD-AT + RPAT" if r["rpat"] else "PGD-AT"
        print(f"{args.arch:>16} bs={args.batch_size} {name:<14} {r['images_per_s']:8.1f} img/s "
              f"{r['seconds_per_step'] * 1000:8.1f} ms/step  "
              f"peak {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
