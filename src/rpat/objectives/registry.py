"""The method registry: base methods by name, building an ``Objective``, and run labels.

``METHODS`` maps a config's ``method.name`` to its ``BaseMethod`` class; ``build_objective``
composes one with the optional RPAT and teacher terms; ``method_label`` gives a run's
human label from the classes' ``label`` attributes (one label per class, used everywhere).
"""

from __future__ import annotations

from ..attacks.threat import ThreatModel
from ..errors import InputError
from .base import BaseMethod
from .consistency import ConsistencyAT
from .mart import MART
from .objective import Objective
from .pgd_at import PGDAT
from .rebat import TARGET_LABELS, TeacherTerm, check_target
from .rpat import RPATTerm, check_proxy
from .trades import TRADES

METHODS: dict[str, type[BaseMethod]] = {
    "pgd_at": PGDAT, "trades": TRADES, "mart": MART, "consistency_at": ConsistencyAT,
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def method_class(method: str) -> type[BaseMethod]:
    """The ``BaseMethod`` subclass registered as ``method``; InputError listing the valid names."""
    cls = METHODS.get(method)
    if cls is None:
        raise InputError(f"unknown method {method!r}; valid: {', '.join(list_methods())}")
    return cls


def build_objective(method: str, threat: ThreatModel, rpat: RPATTerm | None = None,
                    teacher: TeacherTerm | None = None, **options: object) -> Objective:
    """``build_objective("pgd_at", threat, RPATTerm())`` -> PGD-AT + RPAT; ``teacher``: ReBAT / RPAT++ term.

    ``options`` go to the method's constructor (``Config.method_options()``, e.g. MART's ``exact``).
    """
    return Objective(method_class(method)(threat, **options), rpat, teacher)


def method_label(method: str, rpat: bool = False, proxy: str = "logits", teacher_target: str | None = None) -> str:
    """The human label of a run: ``"PGD-AT"``, ``"TRADES + RPAT"``, ``"ReBAT"``, ``"RPAT++ (TRADES)"``...

    Wording, in this order:

    - without a teacher term: the base method's label (``BaseMethod.label``: ``"PGD-AT"``,
      ``"TRADES"``, ``"MART"``, ``"Consistency-AT"``);
    - with a teacher term (``teacher_target`` set): the teacher's label instead,
      ``"ReBAT"`` (target ``"adversarial"``) or ``"RPAT++"`` (``"robust_perception"``), so the
      Table 6 rows read exactly ``"ReBAT"`` / ``"RPAT++"``; a base method other than
      PGD-AT follows in parentheses: ``"ReBAT (TRADES)"``;
    - then, when ``rpat``, ``" + RPAT"``, and the proxy in parentheses when it is not the
      logits: ``"PGD-AT + RPAT (second_to_last)"``, ``"ReBAT (MART) + RPAT"``.

    ``proxy`` is only read (and checked) when ``rpat``. Unknown method names, teacher
    targets or proxies raise ``InputError`` listing the valid ones.
    """
    base = method_class(method).label
    if teacher_target is None:
        label = base
    else:
        check_target(teacher_target)
        label = TARGET_LABELS[teacher_target] + ("" if method == "pgd_at" else f" ({base})")
    if rpat:
        check_proxy(proxy)
        label += f" + {RPATTerm.label}" + ("" if proxy == "logits" else f" ({proxy})")
    return label
