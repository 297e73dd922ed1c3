"""Train R independent runs of one model together: parameters stacked on a leading run dimension.

``torch.func.stack_module_state`` turns R models into one dict of ``[R, ...]`` tensors; the forward pass is
``vmap(functional_call)`` over them, so each step is a handful of batched kernels instead of R small ones.
The total loss is the sum of the members' losses, so each member's gradient is exactly its own; Adam is
element-wise, so one Adam over the stacked tensors is R independent Adams. The ensemble is trained by the
same loop and step as a single model (:mod:`mtrank.train.loop`), with every decision per member: a member
follows the trajectory :class:`~mtrank.train.Trainer` gives its seed alone (same initialisation, shuffling,
evaluation, best-step selection, early stopping, per-member gradient clipping, sample weights,
distillation, bf16 autocast, checkpoints), up to float rounding of batched vs. plain matmuls (tested). With
dropout (or gate dropout, noisy gates) the members draw their masks from one batched draw, so they train
like, but not mask for mask as, the single runs. Data-parallel training of an ensemble is refused.

Data: every member reads either its own dataset (``dense [R, N, F]``, e.g. a fresh synthetic draw per run) or
one shared dataset (``[N, F]``, e.g. census with different seeds).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, stack_module_state, vmap

from mtrank.config import ModelConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.gates import gate_entropy
from mtrank.evaluate.metrics import stacked_task_metrics
from mtrank.model import MultiTaskModel
from mtrank.train.callbacks import Callback
from mtrank.train.cuda_graph import GraphedStep
from mtrank.train.distributed import rank_and_world
from mtrank.train.loop import TrainingLoop, TrainResult
from mtrank.train.losses import FunnelSpec
from mtrank.train.optim import clip_gradients_per_run
from mtrank.train.sources import InMemorySource
from mtrank.train.step import resolve_device

_FIELDS = ("dense", "sparse", "labels", "weights", "teacher")


@dataclass
class EnsembleData:
    """Rows for R members: tensors with a leading run dimension ``[R, N, ...]``, or shared ``[N, ...]``.

    ``weights`` (sample weights) and ``teacher`` (teacher logits for distillation) are optional, per member or
    shared like the rest.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None
    teacher: torch.Tensor | None = None

    @classmethod
    def stack(cls, parts: list[TensorData]) -> EnsembleData:
        """One dataset per member (all of the same length)."""

        def stacked(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.stack(values)

        return cls(*(stacked(name) for name in _FIELDS))

    @classmethod
    def shared(cls, data: TensorData) -> EnsembleData:
        """One dataset read by every member."""
        return cls(*(getattr(data, name) for name in _FIELDS))

    @property
    def per_member(self) -> bool:
        return self.labels.dim() == 3

    def __len__(self) -> int:
        return self.labels.shape[-2]

    def take(self, index: torch.Tensor) -> TensorData:
        """Rows ``index [R, B]`` of each member -> a batch of ``[R, B, ...]`` tensors (one ``index_select`` per
        tensor on a flat ``[R * N, ...]`` view: several times faster than advanced indexing on CPU)."""
        runs, rows = index.shape
        flat = index.reshape(-1)
        if self.per_member:
            flat = flat + (torch.arange(runs, device=index.device) * len(self)).repeat_interleave(rows)

        def gather(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            source = t.flatten(0, 1) if self.per_member else t
            return source.index_select(0, flat).view(runs, rows, *t.shape[(2 if self.per_member else 1) :])

        return TensorData(*(gather(getattr(self, name)) for name in _FIELDS))

    def rows(self, start: int, stop: int, members: int) -> TensorData:
        """Rows ``start:stop`` of every member (a slice of shared data is expanded over the members)."""
        out = []
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None:
                t = t[:, start:stop] if self.per_member else t[start:stop].expand(members, *t[start:stop].shape)
            out.append(t)
        return TensorData(*out)

    def member(self, r: int) -> TensorData:
        return TensorData(*(None if t is None else (t[r] if self.per_member else t) for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, name) for name in _FIELDS]

    def to(self, device: torch.device | str) -> EnsembleData:
        return EnsembleData(*(None if t is None else t.to(device) for t in self._tensors()))


class _PerRun:
    """A :class:`TrainResult` field of every member, as a list."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, result: EnsembleResult, owner: type | None = None) -> list:
        return [getattr(run, self.name) for run in result.runs]


@dataclass
class EnsembleResult:
    """Per member: the evaluation history, best step, best validation value and metrics."""

    runs: list[TrainResult] = field(default_factory=list)

    history = _PerRun()
    best_step = _PerRun()
    best_value = _PerRun()
    best_metrics = _PerRun()

    @property
    def steps(self) -> int:
        return self.runs[0].steps

    @property
    def seconds(self) -> float:
        return self.runs[0].seconds

    @property
    def eval_seconds(self) -> float:
        """The part of :attr:`seconds` spent evaluating on validation."""
        return self.runs[0].eval_seconds


class Ensemble:
    """R models of one architecture, trained as one (see the module docstring).

    Args:
        config: the architecture of every member.
        init_seeds: one seed per member; member r is ``MultiTaskModel(config, seed=init_seeds[r])``, exactly the
            model a single run with that seed would build.
        device: ``cpu``, ``cuda`` or ``auto``.
        cuda_graphs: on CUDA, capture the whole ensemble step in one CUDA graph when replay is exact
            (:func:`~mtrank.train.cuda_graph.cuda_graph_plan`); False keeps the eager step.

    Example:
        >>> from mtrank.config import ModelConfig
        >>> ens = Ensemble(ModelConfig(inputs={"num_dense": 100}), init_seeds=[0, 1, 2])
        >>> ens.logits(torch.randn(3, 5, 100), torch.zeros(3, 5, 0, dtype=torch.long)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(
        self, config: ModelConfig, init_seeds: list[int], device: str = "cpu", cuda_graphs: bool = True
    ) -> None:
        self.device = resolve_device(device)
        self.cuda_graphs = cuda_graphs
        self.config = config.validate("model")
        self.init_seeds = list(init_seeds)
        models = [MultiTaskModel(config, seed=seed) for seed in self.init_seeds]
        self.base = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(self.device).requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.binary_mask = models[0].binary_mask.to(self.device)
        self.funnel = FunnelSpec.from_config(self.config)
        self.task_weights = torch.tensor([t.weight for t in self.config.tasks], device=self.device)
        self.task_names = config.task_names
        self._random_sources = models[0].random_sources()
        self.loop: TrainingLoop | None = None

        def member_forward(params, buffers, dense, sparse):
            out = functional_call(self.base, (params, buffers), (dense, sparse))
            return out.task_logits, out.aux_loss, out.gate_weights

        self._forward = vmap(member_forward, in_dims=(0, 0, 0, 0), randomness="different")

    # ------------------------------------------------------------------ the loop's Runs protocol

    @property
    def num_runs(self) -> int:
        return len(self.init_seeds)

    @property
    def size(self) -> int:
        return self.num_runs

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def tables(self) -> list[torch.Tensor]:
        return []  # no sparse tables: fit refuses train.sparse

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.params.items())

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def forward(self, batch: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` of ``[R, B, ...]`` tensors -> task logits ``[R, B, K]``, auxiliary losses ``[R]``."""
        logits, aux, _ = self._forward(self.params, self.buffers, batch.dense, batch.sparse)
        return logits, aux

    def clip_gradients(self, max_norm: float) -> None:
        clip_gradients_per_run(self.parameters(), max_norm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(state[name])

    def snapshot(self, runs: list[int], best: dict | None) -> dict[str, torch.Tensor]:
        if best is None:
            return {k: v.detach().clone() for k, v in self.params.items()}
        rows = torch.tensor(runs, device=self.device)
        for k, v in self.params.items():
            best[k][rows] = v.detach()[rows]
        return best

    def restore(self, best: dict[str, torch.Tensor], runs: list[int]) -> None:
        rows = torch.tensor(runs, device=self.device)
        with torch.no_grad():
            for k, v in self.params.items():
                v[rows] = best[k][rows]

    def random_sources(self) -> list[str]:
        return self._random_sources

    def describe(self) -> dict:
        return {"model": self.config.to_dict(), "init_seeds": self.init_seeds}

    # ------------------------------------------------------------------ training and evaluation

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``dense [R, B, F], sparse [R, B, C]`` -> task logits ``[R, B, K]``."""
        return self._forward(self.params, self.buffers, dense, sparse)[0]

    @torch.no_grad()
    def predict(self, data: EnsembleData, batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Task logits ``[R, N, K]`` and gate weights ``[R, N, K, E]`` of every member on its rows (float32, CPU),
        in evaluation mode."""
        was_training = self.base.training
        self.base.eval()
        logits, gates = [], []
        try:
            for start in range(0, len(data), batch_size):
                batch = data.rows(start, min(start + batch_size, len(data)), self.num_runs)
                dense, sparse = batch.dense.to(self.device), batch.sparse.to(self.device)
                out = self._forward(self.params, self.buffers, dense, sparse)
                logits.append(out[0].float().cpu())
                gates.append(out[2].float().cpu())
        finally:
            self.base.train(was_training)
        return torch.cat(logits, 1), torch.cat(gates, 1)

    def evaluate(self, data: EnsembleData) -> list[dict[str, float]]:
        """Per-member metrics (those of :func:`~mtrank.evaluate.task_metrics`) and gate entropies on whole splits."""
        logits, gates = self.predict(data)
        metrics = stacked_task_metrics(self.config.tasks, logits, data.labels.cpu())
        entropy = gate_entropy(gates).tolist()  # (R, K)
        for member, values in zip(metrics, entropy):
            member.update({f"gate_entropy/{name}": value for name, value in zip(self.task_names, values)})
        return metrics

    def member(self, r: int) -> MultiTaskModel:
        """Member ``r`` as a plain :class:`MultiTaskModel` (on CPU)."""
        model = MultiTaskModel(self.config)
        model.load_state_dict({k: v[r].detach().cpu() for k, v in self.state_dict().items()})
        return model

    @property
    def graphed_step(self) -> GraphedStep | None:
        """The CUDA graph of the last fit's step, when it was graphed."""
        step = self.loop.step if self.loop is not None else None
        return step.graph if step is not None else None

    def fit(
        self,
        train: EnsembleData,
        valid: EnsembleData | None,
        config: TrainConfig,
        shuffle_seeds: list[int] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> EnsembleResult:
        """Train every member; each ends with its best validation weights.

        ``shuffle_seeds[r]`` seeds member r's batch order exactly as ``TrainConfig.seed`` does in
        :class:`~mtrank.train.Trainer` (default: the init seeds).
        """
        cfg = config.validate()
        if rank_and_world()[1] > 1:
            raise ValueError("an ensemble trains in one process; launch it without torchrun")
        shuffle_seeds = list(shuffle_seeds if shuffle_seeds is not None else self.init_seeds)
        if len(shuffle_seeds) != self.num_runs:
            raise ValueError(f"shuffle_seeds has {len(shuffle_seeds)} entries, the ensemble {self.num_runs} members")
        if cfg.distill != "none" and train.teacher is None:
            raise ValueError(f"train.distill={cfg.distill!r} needs teacher logits in the ensemble's training data")
        if cfg.sparse.enabled or cfg.sparse.lr > 0:
            raise ValueError(
                f"train.sparse (optimizer {cfg.sparse.optimizer!r}, lr {cfg.sparse.lr:g}): an ensemble's R stacked "
                "tables are vmapped (no sparse gradients) and share the model's lr; use train.sparse: dense with lr "
                "0, or train the runs one by one (Trainer)"
            )
        graphs = None if self.cuda_graphs else False
        loop = self.loop = TrainingLoop(self, cfg, callbacks, graphs, f"ensemble x{self.num_runs}")
        source = InMemorySource(train, cfg.batch_size, shuffle_seeds, self.device)
        return EnsembleResult(loop.fit(source, valid))
