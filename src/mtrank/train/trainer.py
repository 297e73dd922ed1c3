"""The trainer: one :class:`~mtrank.model.MultiTaskModel` (data-parallel under torchrun) through the one loop."""

from __future__ import annotations

import copy
from typing import Any

import torch

from mtrank.config import TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import evaluate
from mtrank.model import MultiTaskModel
from mtrank.train.callbacks import Callback
from mtrank.train.distributed import rank_and_world
from mtrank.train.loop import TrainingLoop, TrainResult
from mtrank.train.losses import FunnelSpec
from mtrank.train.optim import clip_gradients
from mtrank.train.sources import InMemorySource
from mtrank.train.step import resolve_device


class SingleRun:
    """One model as the loop's :class:`~mtrank.train.loop.Runs` (R = 1); wrapped in
    ``DistributedDataParallel`` when the process is one rank of several. With ``train.sparse`` naming a row-wise
    optimiser, the embedding table's gradient is sparse (:meth:`tables` are what that optimiser trains)."""

    num_runs = 1

    def __init__(self, model: MultiTaskModel, device: torch.device, config: TrainConfig | None = None) -> None:
        self.device = device
        self.sparse = config is not None and config.sparse.enabled and bool(model.embedding_tables())
        self.table_lr = config is not None and config.sparse.lr > 0  # the tables get their own lr
        if self.sparse and rank_and_world()[1] > 1:
            raise ValueError(
                f"train.sparse.optimizer={config.sparse.optimizer!r} trains the table on one device; data-parallel "
                "(DDP) training needs train.sparse: dense (or shard the tables with TorchRec, docs/benchmarks.md)"
            )
        model.sparse_gradients(self.sparse)
        self.model = model.to(device)
        self.task_names = model.task_names
        self.binary_mask = model.binary_mask
        self.funnel = FunnelSpec.from_config(model.config)
        self.task_weights = torch.tensor([t.weight for t in model.config.tasks], device=device)
        self.module: torch.nn.Module = self.model
        if rank_and_world()[1] > 1:
            device_ids = [device.index or torch.cuda.current_device()] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def tables(self) -> list[torch.Tensor]:
        """The embedding tables when ``train.sparse`` names a row-wise optimiser (their gradients are sparse) or
        gives them their own lr (``train.sparse.lr``); else none."""
        return self.model.embedding_tables() if self.sparse or self.table_lr else []

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters())

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def forward(self, batch: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(batch.dense, batch.sparse)
        return out.task_logits, out.aux_loss

    def clip_gradients(self, max_norm: float) -> None:
        clip_gradients(self.parameters(), max_norm)

    def evaluate(self, data: TensorData) -> list[dict[str, float]]:
        return [evaluate(self.model, data, with_gates=True)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def snapshot(self, runs: list[int], best: dict | None) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, best: dict[str, torch.Tensor], runs: list[int]) -> None:
        self.model.load_state_dict(best)

    def random_sources(self) -> list[str]:
        return self.model.random_sources()

    def describe(self) -> dict:
        return {"model": self.model.config.to_dict()}


class Trainer:
    """Trains a :class:`MultiTaskModel` on :class:`TensorData` (or any batch source, e.g. a stream of files).

    * Each epoch shuffles with a generator seeded by ``(seed, epoch)``; a batch is a gather of rows from tensors
      already on the training device.
    * Validation metrics are computed over the whole split every ``eval_every`` steps (or each epoch); the
      weights at the best ``monitor`` value are restored at the end (early stopping with ``patience``).
    * With ``checkpoint_dir`` set, a checkpoint is written at every evaluation and an interrupted run resumes
      from it, continuing exactly where it stopped; a checkpoint of another configuration is refused.
    * On CUDA the whole step is one CUDA graph where that is exact (:mod:`mtrank.train.cuda_graph`).
    * With ``train.compile`` the step's forward + loss is ``torch.compile``d (:mod:`mtrank.train.step`); the
      model itself is not wrapped, so its ``state_dict``, evaluation, export and checkpoints are unchanged.

    Args:
        model: the model (its initialisation is seeded by ``MultiTaskModel(config, seed=...)``).
        config: the training config.
        cuda_graphs: None (default) graphs the step where exact; False keeps the eager step.
        callbacks: default: a progress bar, and a JSON-lines history / TensorBoard when ``log_dir`` is set.

    Example:
        >>> from mtrank.config import ModelConfig, TaskConfig, TrainConfig
        >>> from mtrank.data import make_synthetic
        >>> train, valid = make_synthetic(n=2000, seed=0).split((0.8, 0.2))
        >>> tasks = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 100}, tasks=tasks), seed=0)
        >>> result = Trainer(model, TrainConfig(epochs=2, batch_size=128, progress=False)).fit(train, valid)
        >>> result.steps, result.best_step
        (26, 26)
    """

    def __init__(
        self,
        model: MultiTaskModel,
        config: TrainConfig,
        cuda_graphs: bool | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.config = config.validate()
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.runs = SingleRun(self.model, self.device, self.config)
        self.loop = TrainingLoop(self.runs, self.config, callbacks, cuda_graphs)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.loop.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.loop.optimizer = optimizer

    @property
    def step_path(self) -> str:
        """``"cuda_graph"`` or ``"eager"``, or with ``train.compile`` ``"cuda_graph+compiled"`` or ``"compiled"``;
        :attr:`step_path_reason` says why."""
        return self.loop.step_path

    @property
    def step_path_reason(self) -> str:
        return self.loop.step_path_reason

    @property
    def graphed_step(self):
        """The CUDA graph of the last fit's step (:class:`~mtrank.train.cuda_graph.GraphedStep`), when graphed."""
        step = self.loop.step
        return step.graph if step is not None else None

    def fit(self, train: TensorData | Any, valid: TensorData | None = None) -> TrainResult:
        """Train on ``train`` (in-memory :class:`TensorData`, or a batch source such as
        :class:`~mtrank.train.sources.StreamSource`); returns the result, the model holding its best weights."""
        cfg = self.config
        if isinstance(train, TensorData):
            if cfg.distill != "none" and train.teacher is None:
                raise ValueError(
                    f"train.distill={cfg.distill!r} needs teacher logits: attach them with data.with_teacher(logits)"
                )
            if train.num_tasks != len(self.model.tasks):
                tasks = len(self.model.tasks)
                raise ValueError(f"data has {train.num_tasks} label columns, the model has {tasks} tasks")
            rank, world = rank_and_world()
            train = InMemorySource(train, cfg.batch_size, cfg.seed, self.device, world, rank)
        return self.loop.fit(train, valid)[0]
