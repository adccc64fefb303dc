"""The finished stages of one evaluation, kept beside its report so a killed evaluation recomputes only
the stage it was killed in.

A stage is a named, deterministic part of a report: ``clean_pgd`` (Clean and PGD-20), each extra
evaluation (``cw``, ``noise``, ``transfer``, ``cw_art``) and each corruption (``corruption:<name>``).
AutoAttack keeps its own finer state (:mod:`rpat.attacks.autoattack_state`, per attack). After a stage
finishes its record (plain JSON: counts, accuracies, seconds) is written to ``<report>.stages.json``
(:func:`rpat.run_dir.stages_path`) atomically, under the evaluation's settings; a rerun with the same
settings takes the finished records instead of recomputing them (the same numbers: every stage is
seeded), one with other settings starts over. :func:`rpat.evaluation.report.write_report` removes the
file once the report is written. Under torch.distributed every rank reads the file and only rank 0
writes it (the records are equal on every rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils import write_text_atomic

STAGES_FORMAT = "rpat-eval-stages/1"


class Stages:
    """``get(name)`` a finished stage's record (None if not finished), ``put(name, record)`` one more.

    ``path`` None keeps nothing (every stage runs). ``write`` False (ranks other than 0) reads only.
    ``resumed`` lists the stages taken from the file.
    """

    def __init__(self, path: str | Path | None, settings: dict[str, Any], write: bool = True):
        self.path = Path(path) if path is not None else None
        self.settings = json.loads(json.dumps(settings))  # as it compares after a JSON round trip
        self.write = write
        self.records: dict[str, dict[str, Any]] = {}
        self.resumed: list[str] = []
        self.discarded = False  #: a file for other settings was found (and is replaced at the first put)
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None
            if (isinstance(data, dict) and data.get("format") == STAGES_FORMAT
                    and data.get("settings") == self.settings and isinstance(data.get("stages"), dict)):
                self.records = data["stages"]
            else:
                self.discarded = True

    def get(self, name: str) -> dict[str, Any] | None:
        rec = self.records.get(name)
        if rec is not None and name not in self.resumed:
            self.resumed.append(name)
        return rec

    def put(self, name: str, record: dict[str, Any]) -> None:
        self.records[name] = json.loads(json.dumps(record))
        if self.path is not None and self.write:
            text = json.dumps({"format": STAGES_FORMAT, "settings": self.settings, "stages": self.records})
            write_text_atomic(self.path, text + "\n")

