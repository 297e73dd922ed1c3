"""Train R independent runs of one model together: parameters stacked on a leading run dimension.

``torch.func.stack_module_state`` turns R models into one dict of ``[R, ...]`` tensors; the forward pass is
``vmap(functional_call)`` over them, so each step is a handful of batched kernels instead of R small ones.
The total loss is the sum of the members' losses, so each member's gradient is exactly its own; Adam is
element-wise, so one Adam over the stacked tensors is R independent Adams. A member therefore follows the same
trajectory as :class:`~mtrank.train.Trainer` on that seed alone (same initialisation, same shuffling, same
evaluation and best-step selection), up to float rounding of batched vs. plain matmuls (tested). With dropout
(or gate dropout, noisy gates) the members draw their masks from one batched draw, so they train like, but
not mask for mask as, the single runs.

Data: every member reads either its own dataset (``dense [R, N, F]``, e.g. a fresh synthetic draw per run) or
one shared dataset (``[N, F]``, e.g. census with different seeds).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from mtrank.config import ModelConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import higher_is_better, stacked_task_metrics
from mtrank.model import MultiTaskModel
from mtrank.train.cuda_graph import GraphedTrainStep, cuda_graph_plan
from mtrank.train.losses import multitask_loss
from mtrank.train.trainer import lr_lambda, make_optimizer, resolve_device


@dataclass
class EnsembleData:
    """Rows for R members: tensors with a leading run dimension ``[R, N, ...]``, or shared ``[N, ...]``."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def stack(cls, parts: list[TensorData]) -> EnsembleData:
        """One dataset per member (all of the same length)."""
        return cls(
            torch.stack([p.dense for p in parts]),
            torch.stack([p.sparse for p in parts]),
            torch.stack([p.labels for p in parts]),
        )

    @classmethod
    def shared(cls, data: TensorData) -> EnsembleData:
        """One dataset read by every member."""
        return cls(data.dense, data.sparse, data.labels)

    @property
    def per_member(self) -> bool:
        return self.labels.dim() == 3

    def __len__(self) -> int:
        return self.labels.shape[-2]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index [R, B]`` of each member -> ``dense [R, B, F], sparse [R, B, C], labels [R, B, K]``."""
        if self.per_member:
            run = torch.arange(index.shape[0], device=index.device).unsqueeze(1)  # (R, 1)
            return self.dense[run, index], self.sparse[run, index], self.labels[run, index]
        return self.dense[index], self.sparse[index], self.labels[index]

    def member(self, r: int) -> TensorData:
        if self.per_member:
            return TensorData(self.dense[r], self.sparse[r], self.labels[r])
        return TensorData(self.dense, self.sparse, self.labels)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of rows ``index [R, B]`` (what a graphed training step gathers)."""
        return self.rows(index)

    def to(self, device: torch.device) -> EnsembleData:
        return EnsembleData(self.dense.to(device), self.sparse.to(device), self.labels.to(device))


@dataclass
class EnsembleResult:
    """Per member: evaluation history (validation metrics), best step and best validation metrics."""

    history: list[list[dict]] = field(default_factory=list)
    best_step: list[int] = field(default_factory=list)
    best_value: list[float] = field(default_factory=list)
    best_metrics: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0  # part of ``seconds`` spent evaluating on validation


class Ensemble:
    """R models of one architecture, trained as one (see the module docstring).

    Args:
        config: the architecture of every member.
        init_seeds: one seed per member; member r is ``MultiTaskModel(config, seed=init_seeds[r])``, exactly the model a
            single run with that seed would build.
        device: ``cpu``, ``cuda`` or ``auto``.
        cuda_graphs: on CUDA, capture the whole ensemble step in one CUDA graph when replay is exact
            (:func:`~mtrank.train.cuda_graph.cuda_graph_plan`); False keeps the eager step.

    Example:
        >>> from mtrank.config import ModelConfig
        >>> ens = Ensemble(ModelConfig(num_dense=100), init_seeds=[0, 1, 2])
        >>> ens.logits(torch.randn(3, 5, 100), torch.zeros(3, 5, 0, dtype=torch.long)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(
        self, config: ModelConfig, init_seeds: list[int], device: str = "cpu", cuda_graphs: bool = True
    ) -> None:
        self.device = resolve_device(device)
        self.cuda_graphs = cuda_graphs
        self.graphed_step: GraphedTrainStep | None = None
        self.config = config.validate()
        self.init_seeds = list(init_seeds)
        models = []
        for seed in self.init_seeds:
            models.append(MultiTaskModel(config, seed=seed))
        self.base = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(self.device).requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.binary_mask = models[0].binary_mask.to(self.device)
        self.task_weights = torch.tensor([t.weight for t in config.tasks], device=self.device)

        def member_forward(params, buffers, dense, sparse):
            out = functional_call(self.base, (params, buffers), (dense, sparse))
            return out.task_logits, out.aux_loss

        self._forward = vmap(member_forward, in_dims=(0, 0, 0, 0), randomness="different")

    @property
    def size(self) -> int:
        return len(self.init_seeds)

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``dense [R, B, F], sparse [R, B, C]`` -> task logits ``[R, B, K]``."""
        return self._forward(self.params, self.buffers, dense, sparse)[0]

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    @torch.no_grad()
    def predict(self, data: EnsembleData, batch_size: int = 8192) -> torch.Tensor:
        """Task logits of every member on its rows, ``[R, N, K]`` (float32, CPU), in evaluation mode."""
        was_training = self.base.training
        self.base.eval()
        data = data.to(self.device)
        parts = []
        try:
            for start in range(0, len(data), batch_size):
                # rows are gathered where the data lives (a split may stay on the CPU), then moved
                idx = torch.arange(start, min(start + batch_size, len(data)), device=data.labels.device)
                dense, sparse, _ = data.rows(idx.expand(self.size, -1))
                parts.append(self.logits(dense.to(self.device), sparse.to(self.device)).float().cpu())
        finally:
            self.base.train(was_training)
        return torch.cat(parts, 1)

    def evaluate(self, data: EnsembleData) -> list[dict[str, float]]:
        """Per-member metrics (:func:`~mtrank.evaluate.task_metrics`, the single-run ones) on whole splits."""
        return stacked_task_metrics(self.config.tasks, self.predict(data), data.labels.cpu())

    def member(self, r: int) -> MultiTaskModel:
        """Member ``r`` as a plain :class:`MultiTaskModel` (on CPU)."""
        model = MultiTaskModel(self.config)
        state = {k: v[r].detach().cpu() for k, v in {**self.params, **self.buffers}.items()}
        model.load_state_dict(state)
        return model

    def fit(
        self,
        train: EnsembleData,
        valid: EnsembleData | None,
        config: TrainConfig,
        shuffle_seeds: list[int] | None = None,
        on_eval: Callable[[int, list[dict]], None] | None = None,
    ) -> EnsembleResult:
        """Train all members ``config.steps`` (or epochs) steps; keep each member's best validation weights.

        ``shuffle_seeds[r]`` seeds member r's batch order exactly as ``TrainConfig.seed`` does in
        :class:`~mtrank.train.Trainer` (default: the init seeds). Early stopping and gradient clipping are
        per-run decisions and are not supported here.
        """
        cfg = config.validate()
        if cfg.early_stopping_patience or cfg.grad_clip:
            raise ValueError("train.early_stopping_patience and train.grad_clip must be 0 for an ensemble")
        shuffle_seeds = list(shuffle_seeds if shuffle_seeds is not None else self.init_seeds)
        if len(shuffle_seeds) != self.size:
            raise ValueError(f"shuffle_seeds has {len(shuffle_seeds)} entries, the ensemble {self.size} members")
        train = train.to(self.device)
        n, size = len(train), self.size
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
        eval_every = cfg.eval_every or steps_per_epoch
        # on CUDA, the whole ensemble step in one CUDA graph where replay is exactly the eager step (as Trainer)
        use_graph = cuda_graph_plan(self.base, cfg, self.device)[0] and self.cuda_graphs
        # the Trainer's optimizer (fused Adam): the same update arithmetic as a single run, eager or graphed
        optimizer = make_optimizer(self.params.values(), cfg, self.device, capturable=use_graph)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        higher = higher_is_better(cfg.monitor)
        result = EnsembleResult(
            history=[[] for _ in range(size)],
            best_step=[0] * size,
            best_value=[math.nan] * size,
            best_metrics=[{} for _ in range(size)],
        )
        best = {k: v.detach().clone() for k, v in self.params.items()}
        member_loss = vmap(multitask_loss, in_dims=(0, 0, None, None))

        def batch_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            dense, sparse, labels = batch
            logits, aux = self._forward(self.params, self.buffers, dense, sparse)  # (R, B, K), (R,)
            losses, _ = member_loss(logits, labels, self.binary_mask, self.task_weights)  # (R,)
            return (losses + aux).sum()  # each member's gradient is its own loss's

        graphed = GraphedTrainStep(batch_loss, optimizer, train, (size, cfg.batch_size)) if use_graph else None
        self.graphed_step = graphed
        self.train(True)
        bar = tqdm(
            total=total_steps,
            disable=not cfg.progress,
            desc=f"ensemble x{size}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        start = time.perf_counter()
        step = 0
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            orders = torch.stack(
                [
                    torch.randperm(n, generator=torch.Generator().manual_seed(s * 1_000_003 + epoch))
                    for s in shuffle_seeds
                ]
            ).to(self.device)  # (R, N), each the order Trainer would use for that seed
            for i in range(offset, steps_per_epoch):
                index = orders[:, i * cfg.batch_size : (i + 1) * cfg.batch_size]  # (R, B)
                if graphed is not None:
                    graphed.step(index)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss(train.take(index)).backward()
                    optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                if valid is not None and (step % eval_every == 0 or step == total_steps):
                    eval_start = time.perf_counter()
                    metrics = self.evaluate(valid)
                    improved = []
                    for r, m in enumerate(metrics):
                        m = {"step": step, **{f"valid/{k}": v for k, v in m.items()}}
                        result.history[r].append(m)
                        value = m.get(f"valid/{cfg.monitor}", math.nan)
                        old = result.best_value[r]
                        if not math.isnan(value) and (math.isnan(old) or (value > old if higher else value < old)):
                            result.best_step[r], result.best_value[r] = step, value
                            result.best_metrics[r] = {k[6:]: v for k, v in m.items() if k.startswith("valid/")}
                            improved.append(r)
                    if improved:
                        rows = torch.tensor(improved, device=self.device)
                        for k, v in self.params.items():
                            best[k][rows] = v.detach()[rows]
                    result.eval_seconds += time.perf_counter() - eval_start
                    if on_eval is not None:
                        on_eval(step, metrics)
                    bar.set_postfix(valid=f"{np.nanmean([m['loss'] for m in metrics]):.4f}", refresh=False)
                if step >= total_steps:
                    break
        bar.close()
        result.steps = step
        result.seconds = time.perf_counter() - start
        if valid is not None:
            with torch.no_grad():
                for k, v in self.params.items():
                    v.copy_(best[k])
        return result
