"""ReBAT's BoAT regularizer and its RPAT++ variant: a KL term towards the weight-averaged model.

ReBAT (Wang et al., NeurIPS 2023) trains with PGD-AT plus, after a warm-up,

    β · KL( p_wa(x_adv) ‖ p(x_adv) )                                   (target "adversarial")

where ``p = softmax(f(·))`` is the online model's prediction and ``p_wa`` the
weight-averaged (WA) model's (``rpat.models.averaging``), the teacher. RPAT++
replaces the teacher's target by the WA model's *robust-perception* prediction:
with Δ = x_adv − x and the interpolation rate a,

    β · KL( softmax(h_wa(x + aΔ) − (1 − a)·h_wa(x)) ‖ softmax(a·h(x + Δ)) )   (target "robust_perception")

which is the Robust Perception identity ``h(x + aΔ) − (1 − a)·h(x) = a·h(x + Δ)``
read as "teacher on the left, student on the right". h are logits here.

Choices (documented in docs/rebat.md):
- the teacher runs in eval mode (BatchNorm uses its averaged running statistics
  and does not update them) and without gradients; the student's ``f(x_adv)`` is
  the train-mode pass the base loss already made (shared through ``Forwards``);
- KL is summed over classes and averaged over the batch (``batchmean``);
- β may grow with the learning-rate decays: ``β_e = β · growth^k`` with k the
  number of lr milestones <= epoch e (growth 1: constant β).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import Forwards
from .rpat import interpolate

TARGETS: tuple[str, ...] = ("adversarial", "robust_perception")
#: The method a teacher target makes, as run labels name it (Table 6 rows).
TARGET_LABELS: dict[str, str] = {"adversarial": "ReBAT", "robust_perception": "RPAT++"}


def check_target(target: str) -> None:
    """InputError unless ``target`` is one of ``TARGETS``."""
    if target not in TARGETS:
        raise InputError(f"unknown rebat.target {target!r}; valid: {', '.join(TARGETS)}")


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) ‖ softmax(student))``: summed over classes, mean over the batch.

    Both ``(B, K)``; the teacher side is treated as a constant target.
    """
    log_p_t = F.log_softmax(teacher_logits.detach(), dim=1)
    log_p_s = F.log_softmax(student_logits, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def robust_perception_target(h_wa_clean: torch.Tensor, h_wa_mid: torch.Tensor, alpha: float) -> torch.Tensor:
    """The teacher logits of RPAT++: ``h_wa(x + aΔ) − (1 − a)·h_wa(x)``, ``(B, K)``."""
    return h_wa_mid - (1.0 - alpha) * h_wa_clean


@dataclass
class TeacherTerm:
    """The BoAT / RPAT++ term ``β_e · KL(teacher ‖ student)``, added by ``Objective.loss``.

    beta: β >= 0. start_epoch: first 0-based epoch with the term on (the WA warm-up).
    target: ``"adversarial"`` (ReBAT) or ``"robust_perception"`` (RPAT++).
    alpha: the interpolation rate a in (0, 1] of the RPAT++ target.
    beta_growth, milestones: ``β_e = β · beta_growth^k``, k = milestones <= e.
    teacher: the weight-averaged model; the trainer binds it (``bind``) before training.
    """

    beta: float = 1.0
    start_epoch: int = 0
    target: str = "adversarial"
    alpha: float = 0.5
    beta_growth: float = 1.0
    milestones: Sequence[int] = ()
    teacher: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_target(self.target)
        for name in ("beta", "beta_growth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise InputError(f"rebat.{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise InputError(f"rebat.alpha must be a number in (0, 1], got {self.alpha!r}")
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise InputError(f"rebat.start_epoch must be an integer >= 0, got {self.start_epoch!r}")

    @property
    def name(self) -> str:
        return "boat" if self.target == "adversarial" else "rp_teacher"

    @property
    def label(self) -> str:
        """``"ReBAT"`` (target adversarial) or ``"RPAT++"`` (target robust_perception)."""
        return TARGET_LABELS[self.target]

    def bind(self, teacher: nn.Module) -> None:
        """Use ``teacher`` (the weight-averaged model, kept in eval mode) from now on."""
        self.teacher = teacher

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and self.beta > 0

    def weight(self, epoch: int) -> float:
        """β for 0-based ``epoch``: ``beta · beta_growth^(number of milestones <= epoch)``."""
        return self.beta * self.beta_growth ** sum(1 for m in self.milestones if epoch >= m)

    def __call__(self, fw: Forwards, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """The KL (without β) for images ``x``, ``x_adv`` ``(B, C, H, W)`` in [0, 1]; 0-dim tensor."""
        if self.teacher is None:
            raise RuntimeError("TeacherTerm has no teacher: call bind(averaged_model) first")
        student = fw.logits("adv", x_adv)
        with torch.no_grad():
            was_training = self.teacher.training
            self.teacher.eval()
            try:
                if self.target == "adversarial":
                    target = self.teacher(x_adv)
                else:
                    both = self.teacher(torch.cat([x, interpolate(x, x_adv, self.alpha)]))
                    h_clean, h_mid = both.chunk(2)
                    target = robust_perception_target(h_clean, h_mid, self.alpha)
            finally:
                self.teacher.train(was_training)
        if self.target == "robust_perception":
            student = self.alpha * student
        return kl_to_teacher(target, student)
