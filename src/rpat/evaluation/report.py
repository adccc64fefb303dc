"""Evaluate a checkpoint into a report: the one path ``rpat eval``, ``rpat train --eval`` and ``rpat sweep`` take.

:func:`write_report` runs :func:`~rpat.evaluation.checkpoint_eval.evaluate_checkpoint` with AutoAttack's
resume state beside the report (``<report>.aa-state.json``, :func:`rpat.run_dir.aa_state_path`): a state
an interrupted run left with the same settings is continued; one saved with other settings is discarded
(said) and the evaluation starts over, since the new report replaces the one that state was for. The
report JSON is then written atomically and the state removed. The other stages (Clean + PGD, each
extra evaluation, each corruption) are kept the same way in ``<report>.stages.json``
(:mod:`rpat.evaluation.stages`), so a rerun after a kill recomputes only the stage it was killed in.
Under torch.distributed every rank evaluates its share; only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import InputError
from ..run_dir import aa_state_path, remove_aa_state, stages_path, write_report_file
from .checkpoint_eval import aa_version, evaluate_checkpoint
from .sanity import summarize

#: How the AutoAttack engine words a saved state that belongs to other settings.
STALE_STATE = "written for other settings"


def write_report(
    checkpoint: str | Path,
    report_path: str | Path,
    *,
    say: Callable[[str], None] | None = None,
    sanity: bool = False,
    force: bool = False,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """Evaluate ``checkpoint`` (``**kwargs`` go to ``evaluate_checkpoint``) and write its report to ``report_path``.

    ``say`` gets one line per event (resuming, discarding a stale state, the sanity summary, the path
    written); ``sanity`` runs the sanity checks (on rank 0 only); ``force`` drops a saved AutoAttack
    state first; ``extra`` is merged into the report (e.g. ``selected_on``, a sweep's settings).
    Returns the report dict on rank 0, None on the other ranks.
    """
    say = say or (lambda m: None)
    # the process group that is up now (not the launcher's environment: after training under torchrun,
    # rank 0 evaluates alone once the group is gone)
    rank, world_size = distributed.world()
    ctx = distributed.DistContext(rank=rank, world_size=world_size)
    report_path = Path(report_path)
    state = aa_state_path(report_path) if aa_version(kwargs.get("autoattack", True)) != "none" else None
    stages = stages_path(report_path)
    if force and ctx.is_main:
        remove_aa_state(report_path)
        stages.unlink(missing_ok=True)
    distributed.barrier(ctx)
    if state is not None and state.is_file():
        say(f"resuming AutoAttack from {state}")

    def run() -> tuple[Any, dict[str, Any]]:
        return evaluate_checkpoint(checkpoint, aa_state=state, stage_state=stages, sanity=sanity and ctx.is_main,
                                   **kwargs)

    try:
        report, info = run()
    except InputError as e:  # a state left by a killed run with other settings: this report replaces it
        if state is None or STALE_STATE not in str(e):
            raise
        say(f"discarding {state}: it was saved by an evaluation with other settings")
        distributed.barrier(ctx)  # every rank has failed to load it before it goes
        if ctx.is_main:
            remove_aa_state(report_path)
        distributed.barrier(ctx)
        report, info = run()
    if not ctx.is_main:
        return None
    if report.extras.get("aa_resumed"):
        say(f"{checkpoint}: AutoAttack continued from the saved state of an interrupted run")
    if report.extras.get("stages_resumed"):
        reused = ", ".join(report.extras["stages_resumed"])
        say(f"{checkpoint}: finished stages of an interrupted run reused: {reused}")
    if "sanity" in info:
        say(summarize(info["sanity"]))
    result = {**info, **report.to_dict(), **(extra or {})}
    write_report_file(report_path, result)
    remove_aa_state(report_path)
    stages.unlink(missing_ok=True)
    say(f"wrote {report_path}")
    return result
