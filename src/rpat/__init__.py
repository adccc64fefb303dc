"""rpat: adversarial training with Robust Perception (RPAT, ICCV 2025).

Quick map: ``rpat.data`` (datasets, on-device batches), ``rpat.models``
(``create_model``), ``rpat.attacks`` (``pgd``, AutoAttack), ``rpat.objectives``
(PGD-AT, the RPAT term), ``rpat.training`` (``Trainer``), ``rpat.evaluation``
(Clean / PGD-20 / AA / Mean / NRR), ``rpat.cli`` (the ``rpat`` command).

Threads: importing rpat sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before torch
loads, so that idle OpenMP threads sleep instead of spinning on cores another job needs
(7.7x slower beside one competing torch process otherwise; see benchmarks/contention.py).
OpenMP reads the variable once, when torch loads: a script that imports torch before rpat
must set it itself (``OMP_WAIT_POLICY=PASSIVE python my_script.py``).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see above)

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .objectives.rpat import RPATTerm, robust_perception_loss  # noqa: E402

__all__ = ["InputError", "RPATTerm", "__version__", "robust_perception_loss"]
