"""Training loop, schedules and run directories."""

from .schedules import cosine_lr, lr_at, piecewise_lr
from .trainer import RunData, Trainer, prepare_data, train

__all__ = ["RunData", "Trainer", "cosine_lr", "lr_at", "piecewise_lr", "prepare_data", "train"]
