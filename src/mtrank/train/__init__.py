"""Training: one step (:mod:`~mtrank.train.step`), one loop over any batch source (:mod:`~mtrank.train.loop`,
:mod:`~mtrank.train.sources`), the single-model trainer, the vectorised ensemble, losses, optimiser,
checkpoints, callbacks, CUDA graphs and data-parallel training."""

from mtrank.train.ensemble import Ensemble, EnsembleData, EnsembleResult
from mtrank.train.loop import TrainingLoop, TrainResult
from mtrank.train.losses import multitask_loss
from mtrank.train.trainer import Trainer

__all__ = ["Ensemble", "EnsembleData", "EnsembleResult", "Trainer", "TrainingLoop", "TrainResult", "multitask_loss"]
