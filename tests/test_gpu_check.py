"""tools/gpu_check.py --cpu-tiny: the prepared GPU check's code path, on the CPU in seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_check  # noqa: E402


def test_cpu_tiny_runs_every_part_and_writes_the_json(tmp_path, cifar10_jpeg_subset):
    pytest.importorskip("PIL")
    out = tmp_path / "out"
    rc = gpu_check.main(["--cpu-tiny", "--out", str(out), "--data-root", str(cifar10_jpeg_subset)])
    summary = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0, summary
    assert summary["mode"] == "cpu-tiny" and set(summary["parts"]) == {"tests", "bench", "train"}
    assert "passed" in summary["parts"]["tests"]["summary"]
    bench = json.loads((out / "cpu_small_cnn_bs8.json").read_text())
    variants = [r["variant"] for r in bench["results"]]
    assert "rpat+cl+bf16+graph" in variants and bench["device_name"]
    assert bench["loss_check"]["abs_diff_loss"] <= 1e-5
    # the trainer's end-to-end figure joined the benchmark file
    runs = summary["parts"]["train"]["runs"]
    assert bench["trainer_images_per_s"] == runs["small_cnn"]["trainer_images_per_s"] > 0
    assert runs["small_cnn"]["epochs"] == 2 and runs["small_cnn_eager"]["epochs"] == 1
    g = runs["small_cnn"]["graph"]  # 64 images, batch 16: 4 full batches per epoch, 3 of them warm-up
    assert g == {"captures": 1, "replays": 5, "eager_warmup_steps": 3}
