"""Build a stand-in "extra" set for a CPU smoke run of ``data.extra``: real CIFAR-10 training images that a
run's ``data.train_subset`` leaves out, written as a generated-data style ``.npz``.

The file has the layout of the generated-data releases (DeepMind's, DM-Improves-AT's): member ``image``
uint8 ``(N, 32, 32, 3)`` (NHWC) and member ``label`` int64 ``(N,)``, uncompressed (``np.savez``), so rpat
memory-maps it. The images are the first ``--n`` of a fixed permutation (seed ``--seed``) of the training
images that are *not* in the fixed ``data.train_subset=--subset`` of ``rpat.training.run_data.train_indices``
(so no image is both real and extra); they are real photos standing in for generated ones.

    python tools/make_extra_standin.py --data-root ~/cifar10-jpeg --subset 2500 --n 10000 --out standin.npz
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rpat.config import build_config
from rpat.data import count_images, load_dataset
from rpat.training.run_data import train_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="image folder with train/<class>/*.jpg (CIFAR-10 JPEG copy)")
    ap.add_argument("--subset", type=int, required=True, help="the run's data.train_subset (these are excluded)")
    ap.add_argument("--n", type=int, default=10_000, help="images in the stand-in set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = build_config(overrides=["data.dataset=imagefolder", f"data.root={args.data_root}",
                                  f"data.train_subset={args.subset}"])
    n_total = count_images("imagefolder", args.data_root, "train")
    used, _ = train_indices(cfg, n_total)
    left = np.setdiff1d(np.arange(n_total), used.numpy())
    if args.n > len(left):
        raise SystemExit(f"only {len(left)} training images are outside the subset; ask for --n <= {len(left)}")
    pick = np.sort(np.random.default_rng(args.seed).permutation(left)[: args.n])
    ds = load_dataset("imagefolder", args.data_root, "train", indices=torch.from_numpy(pick), progress=False)
    images = ds.images.permute(0, 2, 3, 1).contiguous().numpy()  # NCHW -> NHWC, as the releases store it
    np.savez(args.out, image=images, label=ds.labels.numpy().astype(np.int64))
    print(f"wrote {args.out}: {len(pick)} images {images.shape[1:]} uint8 + labels, none of them among the "
          f"{len(used)} images of data.train_subset={args.subset} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
