"""Crash safety end to end: `rpat train` killed (SIGKILL mid-write, SIGTERM, SIGINT, SIGKILL at random)
and resumed each time ends with the same weights as an uninterrupted run, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from crash_harness import MODES, run_harness  # noqa: E402


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    summary = run_harness(4, workdir=tmp_path, seed=1, epochs=10, train_subset=64,
                          modes=["kill-save", "term", "int", "kill"], log=lambda m: None)
    assert summary["failures"] == []
    assert summary["stops"] == 4 and summary["stops_by_mode"] == {m: 1 for m in MODES}
    assert summary["kills_during_checkpoint_write"] == 1  # the SIGKILL landed while a .tmp file existed
    assert summary["checkpoint_loads_checked"] >= 5
    assert summary["final_weights_bit_equal"] and summary["best_weights_bit_equal"]
    assert summary["metrics_rows_equal"]
    assert summary["passed"]
    for e in summary["events"]:
        if e["mode"] in ("term", "int"):
            assert e["clean_exit"] and e["rc"] == {"term": 143, "int": 130}[e["mode"]]
