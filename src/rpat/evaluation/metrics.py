"""Summary scores of the accuracy-robustness trade-off (accuracies in percent, 0..100), and their noise.

The one home of the standard-error formula (:func:`accuracy_se`), of its propagation to
Mean (:func:`mean_se`), of the spread over seeds and of the rule that decides bold
(:func:`clearly_best`); every table (``rpat eval``, ``rpat sweep``, ``rpat report``) uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import InputError


def _as_accuracy(name: str, value: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} accuracy must be a number, got {value!r}") from None
    if isinstance(value, bool) or math.isnan(out) or out < 0:
        raise InputError(f"{name} accuracy must be a number >= 0, got {value!r}")
    return out


def mean_score(clean: float, robust: float) -> float:
    """The arithmetic mean ``(clean + robust) / 2`` of clean and robust (AA) accuracy."""
    return (_as_accuracy("clean", clean) + _as_accuracy("robust", robust)) / 2


def nrr(clean: float, robust: float) -> float:
    """Natural-robust ratio, the harmonic mean ``2·clean·robust / (clean + robust)``.

    0 when both are 0.
    """
    c, r = _as_accuracy("clean", clean), _as_accuracy("robust", robust)
    if c + r == 0:
        return 0.0
    return 2 * c * r / (c + r)


# ---- uncertainty --------------------------------------------------------------------------------------
#: Bold (a column's best) needs a lead of more than this many standard errors of the difference.
NOISE_FACTOR = 2.0


def accuracy_se(acc_percent: float, n: int) -> float:
    """Standard error, in percentage points, of an accuracy measured on ``n`` images.

    ``100·sqrt(p(1−p)/n)`` with ``p = acc_percent / 100``: the binomial standard error
    of the fraction correct (the images a sample of the test distribution). E.g. 72.30 %
    on 1000 images: ``100·sqrt(0.723·0.277/1000) = 1.415``.
    """
    p = _as_accuracy("the", acc_percent) / 100
    if p > 1:
        raise InputError(f"accuracy must be at most 100 %, got {acc_percent!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"the number of images must be a positive integer, got {n!r}")
    return 100 * math.sqrt(p * (1 - p) / n)


def mean_se(se_clean: float, se_robust: float) -> float:
    """A conservative bound on the standard error of Mean = (Clean + AA) / 2: ``(SE_clean + SE_AA) / 2``.

    Clean and AA are measured on the same images, so they are correlated (an image AA
    leaves correct is correct clean); ``sd(X + Y) <= sd(X) + sd(Y)`` for any correlation,
    so the bound holds whatever it is (it is exact for perfectly correlated errors). NRR,
    a harmonic mean, gets no standard error: it is shown without ``±``.
    """
    return (float(se_clean) + float(se_robust)) / 2


def seeds_mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of one number over several seeds (at least 2)."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        raise InputError(f"a spread over seeds needs at least 2 values, got {len(vals)}")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def seeds_noise(sd: float, k: int, se_images: float | None) -> float:
    """The noise of a mean over ``k`` seeds, for the bold rule: ``sqrt(sd²/k + SE_images²)``.

    ``sd/sqrt(k)`` is the standard error of the mean over training seeds; ``se_images`` (the
    :func:`accuracy_se` of the mean on the images it was measured on, None if unknown)
    adds the test-set sampling noise the seeds share, so two seeds that happen to agree
    do not claim more precision than the test set has.
    """
    return math.sqrt(sd**2 / k + (se_images or 0.0) ** 2)


def clearly_best(values: Sequence[float | None], noise: Sequence[float | None],
                 factor: float = NOISE_FACTOR) -> int | None:
    """The index of the best (highest) value when it beats the next-best by more than the noise, else None.

    The rule: bold only when ``best − next > factor·sqrt(SE_best² + SE_next²)`` (``factor`` 2:
    about a 95 % two-sided test that the two differ). None when fewer than two values are
    present, on a tie, or when the standard error of the best or the next-best is unknown
    (a value of unknown noise never claims to beat another). ``noise[i]`` is the standard
    error of ``values[i]``.
    """
    present = sorted(((v, i) for i, v in enumerate(values) if v is not None), reverse=True)
    if len(present) < 2:
        return None
    (best, i), (nxt, j) = present[0], present[1]
    if noise[i] is None or noise[j] is None:
        return None
    return i if best - nxt > factor * math.hypot(noise[i], noise[j]) else None


def format_pm(value: float | None, se: float | None, decimals: int = 2, missing: str = "-",
              pm: str = " ± ") -> str:
    """``"72.30 ± 1.42"``; ``"72.30"`` when ``se`` is None; ``missing`` when ``value`` is None."""
    if value is None:
        return missing
    return f"{value:.{decimals}f}" + ("" if se is None else f"{pm}{se:.{decimals}f}")
