"""Training: multi-task losses and the trainer."""

from mtrank.train.losses import multitask_loss
from mtrank.train.trainer import Trainer, TrainResult

__all__ = ["multitask_loss", "Trainer", "TrainResult"]
