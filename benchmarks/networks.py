"""Parameter counts and one-thread CPU forward time of the networks of issue 21 (docs/networks.md), next to
rpat's ReLU ``wrn28_10`` and ``preact_resnet18``.

For each network: ``sum(p.numel() for p in model.parameters())`` for 10 classes, and the wall time of one
``torch.no_grad()`` eval forward of a batch of random 32x32 images (8; 2 for WRN-70-16), the second call
(the first warms up), divided by the batch size. One thread, so that the numbers do not depend on what
else runs on a shared machine's other cores.

    OMP_NUM_THREADS=1 python benchmarks/networks.py
"""

from __future__ import annotations

import time

import torch

from rpat.models import create_model

NETWORKS: tuple[tuple[str, int], ...] = (
    ("dm_preact_resnet18_swish", 8), ("dm_wrn28_10_swish", 8), ("dm_wrn70_16_swish", 2),
    ("vgg16", 8), ("mobilenetv2", 8), ("preact_resnet18", 8), ("wrn28_10", 8),
)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, batch in NETWORKS:
        model = create_model(name).eval()
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            model(x)
            t = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:26s} params {n:>12,d}  forward {1000 * dt / batch:8.1f} ms/image (batch {batch})")
        del model


if __name__ == "__main__":
    main()
