"""What AutoAugment and CutMix cost in rpat's device loader: img/s of crop/flip vs + AutoAugment vs + CutMix.

The loader (:class:`rpat.data.DeviceLoader`, the trainer's) iterates one epoch over ``--n`` uint8
images of ``--size`` (synthetic, uniform random pixels: the ops' cost does not depend on the
content) in batches of ``--batch-size`` on ``--device``, and yields float batches as training gets
them. Configurations, each timed ``--repeats`` times, interleaved, median reported:

    crop_flip              random crop (4 px zero padding) + horizontal flip (rpat's default augmentation)
    autoaugment            + the CIFAR-10 AutoAugment policy + Cutout (half the side), as data.autoaugment=true
    cutmix                 + CutMix (soft (B, K) labels), as data.cutmix=true
    autoaugment_cutmix     both

``ratio`` is each configuration's img/s over crop_flip's (1.0 = free). On CUDA the clock is read
after ``torch.cuda.synchronize()`` at the end of each epoch only: the loader itself never syncs.

    python benchmarks/augment.py                               # CPU: 8,192 CIFAR-sized images, 5 repeats
    python benchmarks/augment.py --tiny --out /tmp/a.json      # a few seconds' check that it works

Writes JSON (default benchmarks/results/cpu_augment.json; ``--device cuda``: gpu_augment.json), with the
1-minute load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rpat.data import ArrayDataset, DeviceLoader
from rpat.data.batch_augment import BatchAugment

ROOT = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, dict[str, bool]] = {
    "crop_flip": {},
    "autoaugment": {"autoaugment": True},
    "cutmix": {"cutmix": True},
    "autoaugment_cutmix": {"autoaugment": True, "cutmix": True},
}


def _epoch_seconds(loader: DeviceLoader, epoch: int, device: torch.device) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    last = None
    for x, y in loader:
        last = (x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert last is not None
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="images per epoch")
    ap.add_argument("--size", type=int, default=32, help="image side (3 channels)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="512 images, 2 repeats: checks that it runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.repeats = 512, 2
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (args.n, 3, args.size, args.size), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (args.n,), generator=g), [str(k) for k in range(10)])
    loaders = {name: DeviceLoader(ds, args.batch_size, device, augment=True, padding=4, flip=True, seed=0,
                                  batch_augment=BatchAugment(num_classes=10, **flags) if flags else None)
               for name, flags in CONFIGS.items()}
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    for loader in loaders.values():  # warm-up epoch each (allocator, first-call dispatch)
        _epoch_seconds(loader, 0, device)
    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name, loader in loaders.items():
            seconds[name].append(_epoch_seconds(loader, r + 1, device))
    rate = {name: args.n / statistics.median(s) for name, s in seconds.items()}
    result = {
        "what": "rpat.data.DeviceLoader, one epoch of synthetic uint8 images -> float batches (+ labels); "
                "img/s from the median epoch time",
        "n_images": args.n, "image_shape": [3, args.size, args.size], "batch_size": args.batch_size,
        "repeats": args.repeats, "tiny": args.tiny, "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_to_crop_flip": {k: round(v / rate["crop_flip"], 3) for k, v in rate.items()},
        "seconds": seconds,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{'gpu' if device.type == 'cuda' else 'cpu'}_augment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, CONFIGS))
    print(f"{'config':<{width}}  {'img/s':>9}  ratio")
    for k in CONFIGS:
        print(f"{k:<{width}}  {rate[k]:>9.0f}  {rate[k] / rate['crop_flip']:.3f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
