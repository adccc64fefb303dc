"""rpat: adversarial training with Robust Perception (RPAT, ICCV 2025)."""

__version__ = "0.1.0"
