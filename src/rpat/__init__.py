"""rpat: adversarial training with Robust Perception (RPAT, ICCV 2025).

Quick map: ``rpat.data`` (datasets, on-device batches), ``rpat.models``
(``create_model``), ``rpat.attacks`` (``pgd``, AutoAttack), ``rpat.objectives``
(PGD-AT, the RPAT term), ``rpat.training`` (``Trainer``), ``rpat.evaluation``
(Clean / PGD-20 / AA / Mean / NRR), ``rpat.cli`` (the ``rpat`` command).
"""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .objectives.rpat import RPATTerm, robust_perception_loss  # noqa: E402

__all__ = ["InputError", "RPATTerm", "__version__", "robust_perception_loss"]
