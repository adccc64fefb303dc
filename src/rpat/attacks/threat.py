"""Threat models: the norm, the budget ε and the attack's step size and steps.

ε and step sizes are always in pixel units of images in [0, 1]; ``8/255`` is
written as the string ``"8/255"`` or the float ``0.0313...``. They are printed
as ``k/255``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InputError

NORMS: tuple[str, ...] = ("linf", "l2")


def parse_budget(value: str | float | int, what: str = "eps") -> float:
    """Parse ``"8/255"``, ``"0.03"`` or a number into a float in pixel units.

    Raises InputError for anything that is not a non-negative number.
    """
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number such as 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"{what} must be a number such as 8/255, got {value!r}") from None
    if not out >= 0 or out == float("inf"):
        raise InputError(f"{what} must be a finite number >= 0, got {value!r}")
    return out


def format_budget(value: float) -> str:
    """A budget as it is written: ``0.0313725`` -> ``"8/255"``, ``8/2550`` -> ``"0.8/255"``; a value that
    is not a short multiple of 1/255 is printed as a decimal (``"0.0123457"``). The text parses back
    (:func:`parse_budget`) to the value it prints."""
    k = value * 255
    if abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    short = f"{k:.4g}"
    if "e" not in short and abs(float(short) - k) < 1e-6:
        return f"{short}/255"
    return f"{value:.6g}"


@dataclass(frozen=True)
class ThreatModel:
    """An ℓ∞ or ℓ2 ball of radius ``eps`` around each image, clipped to [0, 1].

    eps, step_size: pixel units of [0, 1] images. steps: attack iterations.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        for name in ("eps", "step_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("eps", "step_size"):
            v = getattr(self, name)
            if self.norm == "linf" and v > 1:
                raise InputError(
                    f"ℓ∞ {name}={v:g} is above 1, but images are in [0, 1]; "
                    f"did you mean {v:g}/255? (write it as '{v:g}/255')"
                )
        if not isinstance(self.steps, int) or self.steps < 0:
            raise InputError(f"steps must be an integer >= 0, got {self.steps!r}")

    def with_steps(self, steps: int) -> ThreatModel:
        return replace(self, steps=steps)

    def describe(self) -> str:
        """``"linf eps=8/255 step=2/255 steps=10"``: the whole threat, as banners and reports print it."""
        return (
            f"{self.norm} eps={format_budget(self.eps)} step={format_budget(self.step_size)} "
            f"steps={self.steps}"
        )


def default_threat(norm: str = "linf", steps: int = 10) -> ThreatModel:
    """The paper's training threat models: ℓ∞ 8/255 step 2/255; ℓ2 128/255 step 32/255."""
    if norm == "linf":
        return ThreatModel("linf", 8 / 255, 2 / 255, steps)
    if norm == "l2":
        return ThreatModel("l2", 128 / 255, 32 / 255, steps)
    raise InputError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
