"""The cross-entropy every training loss uses, with label smoothing (``method.label_smoothing``).

``cross_entropy(logits, target, smoothing)`` is the one CE of the training objectives (PGD-AT's
``CE(f(x_adv), y)``, TRADES' clean CE, the CE part of MART's boosted CE, Consistency-AT's CE); the
attacks and the evaluation keep the plain CE (``F.cross_entropy``), so label smoothing changes what
the model is trained towards, never the adversary or the reported numbers.

Targets: ``target`` is either hard labels ``(B,)`` (integers) or soft probabilities ``(B, K)``
(floating point, rows summing to 1: CutMix-style mixed labels). With smoothing ``s`` the target
distribution of example ``i`` is ``q_i = (1 − s_i)·t_i + s_i/K`` (``t_i`` the one-hot or soft row),
and the loss is ``mean_i −Σ_k q_ik·log softmax(logits_i)_k`` — the definition of
``F.cross_entropy(..., label_smoothing=s)`` (Szegedy et al., 2016), which it calls for a scalar ``s``.

Per-example smoothing: ``smoothing`` may be a float (every example) or a ``(B,)`` tensor (one value
per row of ``target``, e.g. 0.1 on the generated-data rows of a batch and 0 on the real ones, as
DeepMind's generated-data recipe smooths only the extra data). The objectives take it as the
``smoothing=`` keyword of ``Objective.step`` / ``Objective.loss`` / ``BaseMethod.loss``
(``None``: the method's configured ``label_smoothing``); for Consistency-AT, whose batch stacks
two views, the tensor has one entry per stacked row (``(2B,)``). A tensor is used as it is, on the
device, with no host read (the step stays CUDA-graph capturable), so its values are not checked here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError


def check_smoothing(value: object, name: str = "method.label_smoothing") -> float:
    """``value`` as a float in [0, 1); InputError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InputError(f"{name} must be a number in [0, 1) (e.g. 0.1), got {value!r}")
    return float(value)


def is_soft(target: Tensor) -> bool:
    """Whether ``target`` holds probabilities ``(B, K)`` (floating point) rather than labels ``(B,)``."""
    return target.is_floating_point()


def cross_entropy(logits: Tensor, target: Tensor, smoothing: float | Tensor = 0.0) -> Tensor:
    """Label-smoothed cross-entropy, averaged over the batch; 0-dim.

    Args:
        logits: ``(B, K)``.
        target: labels ``(B,)`` (int64) or probabilities ``(B, K)`` (floating point).
        smoothing: ``s`` in [0, 1): a float for every example, or a ``(B,)`` tensor, one per example.

    Returns:
        ``mean_i −Σ_k ((1 − s_i)·t_ik + s_i/K)·log softmax(logits_i)_k``; for a float ``s`` exactly
        ``F.cross_entropy(logits, target, label_smoothing=s)`` (and ``F.cross_entropy(logits, target)``
        for ``s = 0``, bit for bit).
    """
    soft = is_soft(target)
    if soft and target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if not soft and target.dim() != 1:
        raise ValueError(f"hard targets must be labels (B,), got shape {tuple(target.shape)}")
    if not isinstance(smoothing, Tensor):
        if smoothing == 0.0:
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=float(smoothing))
    if smoothing.shape != (logits.shape[0],):
        raise ValueError(f"per-example smoothing must have shape ({logits.shape[0]},), got {tuple(smoothing.shape)}")
    # reduced precision (bf16 autocast) is computed in fp32, as autocast runs F.cross_entropy
    low = logits.dtype in (torch.float16, torch.bfloat16)
    logp = F.log_softmax(logits.float() if low else logits, dim=1)
    if soft:
        fit = -(target.to(logp.dtype) * logp).sum(dim=1)  # (B,) CE towards the given distribution
    else:
        fit = -logp.gather(1, target[:, None]).squeeze(1)  # (B,) −log p_y
    uniform = -logp.mean(dim=1)  # (B,) CE towards the uniform distribution
    s = smoothing.to(logp.dtype)
    return torch.lerp(fit, uniform, s).mean()  # (1 − s)·fit + s·uniform


def require_hard(target: Tensor, method: str) -> None:
    """InputError when ``target`` is soft: ``method`` needs hard labels ``(B,)`` (a shape check, no host read)."""
    if is_soft(target):
        raise InputError(f"{method} needs hard labels (B,); it cannot train on soft (B, K) targets such as "
                         "CutMix's: pick another method or turn the mixing off")
