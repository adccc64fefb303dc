"""rpat: adversarial training with Robust Perception (RPAT, ICCV 2025).

Quick map, bottom layer first: ``rpat.data`` (datasets, on-device batches), ``rpat.models``
(``create_model``), ``rpat.attacks`` (``pgd``, AutoAttack), ``rpat.objectives`` (PGD-AT, TRADES,
MART, Consistency-AT, the RPAT term), ``rpat.config``, ``rpat.evaluation`` (Clean / PGD-20 / AA /
Mean / NRR, ``write_report``), ``rpat.training`` (``TrainStep``, ``Trainer``), ``rpat.analysis`` and
``rpat.reports``, ``rpat.experiments`` (sweep, ablation, demo), ``rpat.cli`` (the ``rpat`` command).

Threads: importing rpat sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before torch
loads, so that idle OpenMP threads sleep instead of spinning on cores another job needs
(what that buys beside a competing job is measured in benchmarks/README.md, benchmarks/contention.py).
OpenMP reads the variable once, when torch loads: a script that imports torch before rpat
must set it itself (``OMP_WAIT_POLICY=PASSIVE python my_script.py``).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see above)

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .objectives.rpat import RPATTerm, robust_perception_loss  # noqa: E402

__all__ = ["InputError", "RPATTerm", "__version__", "robust_perception_loss"]
