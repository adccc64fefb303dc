"""Training-batch throughput (img/s) without and with extra data (``data.extra``), side by side, on the CPU.

Variants, timed interleaved in one process (each repetition runs every variant once, in rotating order):

* ``real``: :class:`rpat.data.DeviceLoader` over a synthetic real set (uint8 ``(N_real, 3, 32, 32)`` in
  memory, random pixels), batch ``B``, crop/flip on: what every run without ``data.extra`` does;
* ``npz``: :class:`rpat.data.mixed.MixedLoader` over the same real set plus an uncompressed ``.npz`` of
  ``--extra-images`` random images written to ``--dir`` (memory-mapped), ``round(f·B)`` rows per batch
  from it;
* ``shards``: the same images as 4 ``NAME_image.npy`` / ``NAME_label.npy`` shards;
* ``npz_1m_sparse``: a 1M-image ``.npz`` written as a sparse file (the image bytes are a hole: no disk,
  reads come from zero pages), to show the cost of the index math and the gather at 1M rows and the
  RSS it adds (``/proc/self/status`` VmRSS before opening and after all its batches).

The extra files sit in the page cache after being written (a warm cache: no disk reads); a cold start
on a disk reads each row's 4 KiB page once. Prints one table; ``--out`` writes the JSON.

    OMP_NUM_THREADS=1 python benchmarks/loader.py --out benchmarks/results/cpu_loader_extra.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rpat.data import ArrayDataset, DeviceLoader
from rpat.data.extra import open_extra
from rpat.data.mixed import MixedLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_extra_data import write_sparse_npz  # noqa: E402  (the test's sparse-npz writer)


def rss() -> dict[str, int]:
    """VmRSS, RssAnon (private memory) and RssFile (mapped file pages: page cache, reclaimable), bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def time_batches(loader, epoch: int, n_batches: int) -> float:
    """img/s over the first ``n_batches`` batches of ``epoch`` (float batches, as the trainer gets them)."""
    loader.set_epoch(epoch)
    it = iter(loader)
    seen, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        x, y = next(it)
        seen += y.shape[0]
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-images", type=int, default=50_000)
    ap.add_argument("--extra-images", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--batches", type=int, default=40, help="batches per variant per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the extra files are written (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    real = ArrayDataset(torch.from_numpy(rng.integers(0, 256, (args.real_images, 3, 32, 32), dtype=np.uint8)),
                        torch.from_numpy(rng.integers(0, 10, args.real_images)), [str(i) for i in range(10)])
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    d = Path(tmp.name)
    images = rng.integers(0, 256, (args.extra_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.extra_images)
    t0 = time.perf_counter()
    np.savez(d / "extra.npz", image=images, label=labels)
    write_s = time.perf_counter() - t0
    (d / "shards").mkdir()
    for i, (im, lab) in enumerate(zip(np.array_split(images, 4), np.array_split(labels, 4), strict=True)):
        np.save(d / "shards" / f"part{i}_image.npy", im)
        np.save(d / "shards" / f"part{i}_label.npy", lab)
    del images, labels
    write_sparse_npz(d / "1m.npz", 1_000_000, {})

    def loader(extra: str | None):
        base = DeviceLoader(real, args.batch_size, "cpu", augment=True, padding=4, seed=0)
        return base if extra is None else MixedLoader(base, open_extra(extra), args.fraction)

    variants = {"real": None, "npz": str(d / "extra.npz"), "shards": str(d / "shards"),
                "npz_1m_sparse": str(d / "1m.npz")}
    growth = {k: {"VmRSS": 0, "RssAnon": 0, "RssFile": 0} for k in variants}  # summed over its own batches

    def timed(name: str, epoch: int, n: int) -> float:
        before = rss()
        rate = time_batches(loaders[name], epoch, n)
        after = rss()
        for key in growth[name]:
            growth[name][key] += after[key] - before[key]
        return rate

    before = rss()
    loaders = {k: loader(v) for k, v in variants.items()}
    opened = {k: (v - before[k]) / 2**20 for k, v in rss().items()}
    for name in variants:  # warm-up
        timed(name, 0, 2)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            rates[name].append(timed(name, rep + 1, args.batches))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "what": "training batches per second x batch size (float32 on the device = CPU, crop/flip on), "
                "DeviceLoader (real) vs MixedLoader (real + extra), interleaved repetitions",
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
                   f"{torch.__version__}, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "real_images": args.real_images, "extra_images": args.extra_images, "batch_size": args.batch_size,
        "fraction": args.fraction, "extra_rows_per_batch": round(args.fraction * args.batch_size),
        "batches_per_rep": args.batches, "reps": args.reps,
        "npz_write_seconds": write_s,
        "images_per_s": rates, "median_images_per_s": med,
        "ratio_vs_real": {k: v / med["real"] for k, v in med.items()},
        # per repetition (each variant vs the real loader of the same repetition): robust to a load that drifts
        "paired_ratio_vs_real_median": {k: statistics.median(a / b for a, b in zip(v, rates["real"], strict=True))
                                        for k, v in rates.items()},
        "paired_ratio_vs_real_range": {k: [min(a / b for a, b in zip(v, rates["real"], strict=True)),
                                           max(a / b for a, b in zip(v, rates["real"], strict=True))]
                                       for k, v in rates.items()},
        "rss_growth_mib_opening_all": opened,
        "rss_growth_mib_while_iterating": {k: {kk: vv / 2**20 for kk, vv in v.items()} for k, v in growth.items()},
        "rows_read_per_variant": (args.reps * args.batches + 2) * round(args.fraction * args.batch_size),
    }
    print(f"{'variant':<15} {'img/s (median)':>15} {'range':>15} {'paired vs real (range)':>24}  "
          "RSS growth: anon / file MiB")
    for k in variants:
        g = out["rss_growth_mib_while_iterating"][k]
        lo, hi = out["paired_ratio_vs_real_range"][k]
        print(f"{k:<15} {med[k]:>15,.0f} {min(rates[k]):>7,.0f}-{max(rates[k]):<7,.0f} "
              f"{out['paired_ratio_vs_real_median'][k]:>11.2f}x ({lo:.2f}-{hi:.2f})  "
              f"{g['RssAnon']:.1f} / {g['RssFile']:.1f}")
    print(f"opening all extra sets: RSS +{opened['VmRSS']:.1f} MiB (anon {opened['RssAnon']:.1f}, "
          f"file {opened['RssFile']:.1f}); rows read per extra variant: {out['rows_read_per_variant']:,}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
