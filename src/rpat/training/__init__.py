"""Training: the one step (``step.py``), its CUDA-graph capture, the loop and its run data, schedules."""

from .run_data import RunData, prepare_data
from .schedules import cosine_lr, lr_at, piecewise_lr
from .signals import TrainingInterrupted
from .step import TrainStep
from .trainer import Trainer, train

__all__ = ["RunData", "TrainStep", "Trainer", "TrainingInterrupted", "cosine_lr", "lr_at", "piecewise_lr",
           "prepare_data", "train"]
