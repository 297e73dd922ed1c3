"""The optimiser, its learning-rate schedule and gradient clipping: one definition for every training path."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from mtrank.config import CompileConfig, TrainConfig
from mtrank.train.step import compile_function


def make_optimizer(
    params: Iterable[torch.Tensor],
    config: TrainConfig,
    device: torch.device,
    capturable: bool = False,
    tables: Iterable[torch.Tensor] = (),
) -> torch.optim.Optimizer:
    """Adam / AdamW over ``params``, fused on CPU and CUDA: the same update arithmetic in single runs,
    ensembles, eager and graphed steps. With ``train.sparse`` naming a row-wise optimiser, the embedding
    ``tables`` (among ``params``, with sparse gradients) get it and the rest Adam: a :class:`DenseAndSparse`.
    With ``train.sparse: {optimizer: dense, lr: X}`` the ``tables`` (dense gradients) are a parameter group of the
    same Adam with learning rate X (large-batch recipes scale the dense layers' rate but not the tables').

    ``capturable``: the step can be recorded in a CUDA graph (step counters on the device). On CUDA with float32
    parameters the learning rate is a float32 GPU tensor that a schedule updates in place, so a captured graph,
    which reads it at every replay, follows the schedule (the fused kernel takes a tensor lr with float32
    parameters only; other dtypes keep a float lr, and :func:`~mtrank.train.cuda_graph.cuda_graph_plan` then
    refuses schedules).
    """
    params, tables = list(params), list(tables)
    if config.sparse.enabled and tables:
        table_ids = {id(t) for t in tables}
        dense = make_optimizer([p for p in params if id(p) not in table_ids], config, device, capturable)
        kind = SPARSE_OPTIMIZERS[config.sparse.optimizer]
        sparse = kind(
            tables,
            lr=config.sparse.lr or config.lr,
            stochastic_rounding=config.sparse.stochastic_rounding,
            **({"capturable": True} if capturable else {}),
            **({"compile": config.compile_options} if kind is RowwiseAdagrad and config.compile_options else {}),
        )
        return DenseAndSparse(dense, sparse)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"weight_decay": config.weight_decay}
    if capturable:
        kwargs["capturable"] = True
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel for all parameters instead of ~8 ops per tensor (CPU: ~2x less time)
    table_ids = {id(t) for t in tables}  # train.sparse: dense with its own lr: the tables are a group of their own
    groups = [(config.lr, [p for p in params if id(p) not in table_ids])]
    if tables:
        groups.append((config.sparse.lr or config.lr, tables))
    tensor_lr = device.type == "cuda" and all(p.dtype == torch.float32 for p in params)
    return cls(
        [{"params": group, "lr": torch.tensor(float(lr), device=device) if tensor_lr else lr} for lr, group in groups],
        **kwargs,
    )


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warm-up, then constant / cosine / linear decay."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients of ``params`` to global L2 norm <= ``max_norm`` (no host sync: capturable).

    Sparse gradients (a table under ``train.sparse``): the norm is that of their rows with duplicate ids summed,
    as the dense gradient sums them (:func:`summed_rows`, fixed shapes, so a CUDA graph can capture it), and their
    values are scaled with the rest: the same clipping as the dense gradient would get (``clip_grad_norm_``
    itself refuses sparse tensors)."""
    if not any(p.grad is not None and p.grad.is_sparse for p in params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms, scaled = [], []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            _, sums, _ = summed_rows(p.grad)  # duplicate ids summed (as the dense gradient sums them); 0 past them
            norms.append(sums)
            scaled.append(p.grad._values())  # scaling the uncoalesced values scales their sums alike
        elif p.grad is not None:
            norms.append(p.grad)
            scaled.append(p.grad)
    total = torch.nn.utils.get_total_norm(norms)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    for g in scaled:
        g.mul_(scale.to(g.dtype))


def clip_gradients_per_run(params: list[torch.Tensor], max_norm: float) -> None:
    """:func:`clip_gradients` for R runs stacked on the first dimension of every parameter: each run's
    gradients are scaled by its own global norm, ``min(1, max_norm / (norm_r + 1e-6))``, exactly as
    ``clip_grad_norm_`` scales a single run's (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (R,)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # (R,)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


# --- Sparse row-wise optimisers for big embedding tables -----------------------------------------------------------


def _stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16, rounding up or down with probability proportional to the distance (unbiased: the
    expected stored value equals ``x``), so that updates smaller than half a bf16 ulp are not all lost."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536: mask off the low 16 bits


def summed_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of an uncoalesced sparse row gradient with duplicate ids summed, in arrays of fixed length.

    ``grad`` holds N ``(row, values [D])`` pairs (one per lookup, as ``F.embedding(..., sparse=True)`` makes
    them; a row may repeat). Returns ``rows [N]``, ``sums [N, D]`` (float32) and ``last [N]``: slot ``j < U``
    (U distinct rows) holds the j-th distinct row in ascending order and the sum of its values; slots ``j >= U``
    hold zeros and row ``j mod rows`` (spread over the table, so that adding their zeros does not make every
    padding slot wait on one row's atomics); ``last[j] = min(j, U - 1)``. Every shape depends on N only
    (``coalesce`` returns U rows, a number known only after a device-to-host copy), so a CUDA graph can capture
    it; gathering with ``last`` turns the padding slots into exact copies of the last distinct row.

    Example:
        >>> ids, values = torch.tensor([[5, 2, 5]]), torch.tensor([[1.0], [2.0], [3.0]])
        >>> g = torch.sparse_coo_tensor(ids, values, (9, 1), check_invariants=True)
        >>> rows, sums, last = summed_rows(g)
        >>> rows.tolist(), sums.flatten().tolist(), last.tolist()
        ([2, 5, 2], [2.0, 4.0, 0.0], [0, 1, 1])
    """
    return summed_lookups(grad._indices()[0], grad._values(), grad.shape[0])


def summed_lookups(
    ids: torch.Tensor, values: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`summed_rows` of the lookups ``ids [N]`` with gradient rows ``values [N, D]`` into a table of ``rows``
    rows (plain tensors: what ``torch.compile`` can trace, a sparse tensor it cannot)."""
    n = ids.numel()
    ordered, order = torch.sort(ids)
    first = torch.ones(n, dtype=torch.bool, device=ids.device)
    first[1:] = ordered[1:] != ordered[:-1]
    segment = first.cumsum(0) - 1  # (N,) slot of the i-th smallest id: its row's rank among the distinct rows
    slot = torch.empty_like(segment).scatter_(0, order, segment)  # the slot of each lookup, in the batch's order
    sums = torch.zeros(n, values.shape[1], dtype=torch.float32, device=ids.device)
    sums.index_add_(0, slot, values.float())
    slots = torch.arange(n, device=ids.device).remainder_(rows)
    slots.scatter_(0, segment, ordered)  # every lookup of a row writes the same id
    last = torch.minimum(torch.arange(n, device=ids.device), segment[-1:])
    return slots, sums, last


def rowwise_adagrad_fp32(
    ids: torch.Tensor, values: torch.Tensor, table: torch.Tensor, accum: torch.Tensor, lr: torch.Tensor, eps: float
) -> None:
    """Row-wise Adagrad on a float32 ``table [R, D]`` in place, from the lookups ``ids [N]`` and their gradient
    rows ``values [N, D]`` (:class:`RowwiseAdagrad`'s rule; ``accum [R]``, ``lr`` a 0-d tensor). The update is
    added (``index_add_``): the padding slots of :func:`summed_lookups` add zeros."""
    rows, sums, _ = summed_lookups(ids, values, table.shape[0])
    accum.index_add_(0, rows, sums.square().mean(1))
    scale = lr / (accum.index_select(0, rows).sqrt() + eps)
    table.index_add_(0, rows, sums * -scale.unsqueeze(1))


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Base of the row-wise sparse optimisers: each parameter is a table ``[N, D]`` whose gradient is a sparse
    COO tensor (``nn.Embedding(..., sparse=True)`` / ``F.embedding(..., sparse=True)``). A step sums the values
    of duplicate ids (as dense autograd sums them; :func:`summed_rows`), reads the touched rows in float32,
    applies :meth:`_update` and writes them back; rows absent from the batch are not read or written.

    Every array of a step has the batch's number of lookups as its length (not the number of distinct rows),
    so the step has no device-to-host copy and, with ``capturable=True`` (the learning rate a float32 tensor on
    the table's device that a schedule updates in place), a CUDA graph can record it. The lookups past the
    distinct rows are exact copies of the last distinct row: they write the same values to the same row, so
    the result does not depend on the order of the writes.

    Tables stored in bfloat16 / float16: the arithmetic is float32; the result is written back with
    round-to-nearest, or, with ``stochastic_rounding=True`` and a bfloat16 table, with stochastic rounding.
    """

    graph_safe = True  # whether the update may be captured (LazyAdam keeps its step counter on the host)

    def __init__(self, params, defaults: dict, stochastic_rounding: bool = False, capturable: bool = False) -> None:
        params = list(params)
        if capturable and not self.graph_safe:
            raise ValueError(f"{type(self).__name__} cannot be captured in a CUDA graph (host-side step counter)")
        if capturable and params:
            defaults = {**defaults, "lr": torch.tensor(float(defaults["lr"]), device=params[0].device)}
        super().__init__(params, defaults)
        self.stochastic_rounding, self.capturable = stochastic_rounding, capturable and bool(params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter of shape {tuple(p.shape)} has a dense gradient: build the "
                        "table with sparse=True (EmbeddingTable(..., sparse=True)) or use optimizer: adam for it"
                    )
                if p.grad._nnz() == 0:
                    continue
                if not self._fused(p, self.state[p], group):
                    self._apply(p, self.state[p], group, *summed_rows(p.grad))
        return loss

    def _apply(self, p, state, group, rows, sums, last) -> None:
        """Update the rows of ``p`` from :func:`summed_rows`: the padding slots become copies of the last distinct
        row, :meth:`_update` gives the new rows (float32), written back in ``p``'s dtype."""
        rows, sums = rows.index_select(0, last), sums.index_select(0, last)
        new = self._update(p, state, group, rows, sums, p.index_select(0, rows).float())
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            new = _stochastic_round_bf16(new).index_select(0, last)  # the copies get the same rounding
        p.index_copy_(0, rows, new.to(p.dtype))

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, but the state stays float32: the base class casts floating state to
        the parameter's dtype, which would round a bf16 table's accumulators and moments to bf16."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = dict(zip(ids, (p for group in self.param_groups for p in group["params"])))
        for idx, entry in state_dict["state"].items():
            p = params[int(idx)]
            for key, value in entry.items():
                if torch.is_tensor(value):  # LazyAdam's step counter stays on the host
                    self.state[p][key] = value.clone() if key == "step" else value.to(p.device, copy=True)
        for group in self.param_groups:  # a captured step reads the lr from its tensor: keep it one
            if self.capturable and not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)
            elif self.capturable:
                group["lr"] = group["lr"].to(group["params"][0].device)

    def _fused(self, p, state, group) -> bool:
        """The whole step of ``p`` in one function, where the optimiser has one for ``p``'s dtype: True if done."""
        return False

    def _update(self, p, state, group, rows, grad, weight):  # pragma: no cover - abstract
        raise NotImplementedError


class RowwiseAdagrad(_RowSparseOptimizer):
    """Row-wise Adagrad (as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): one float32 accumulator per row, not per
    element, so the state is ``N x 4`` bytes next to a table of ``N x D x 2|4`` bytes.

    For every row r in the batch with summed gradient ``g_r`` (``[D]``)::

        G_r <- G_r + mean(g_r ** 2)
        w_r <- w_r - lr * g_r / (sqrt(G_r) + eps)

    Rows absent from the batch: ``w_r`` and ``G_r`` unchanged (as dense Adagrad, whose update is 0 for a zero
    gradient: no difference from the dense method except the row-wise accumulator).

    A float32 table's step is one function, :func:`rowwise_adagrad_fp32` (the update added in place, no copy of
    rows back); ``compile`` (``train.compile``'s options) compiles it, so that summing the lookups, the
    accumulator and the scaled update are a few fused kernels instead of a dozen passes over ``[lookups, D]``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        eps: float = 1e-8,
        stochastic_rounding: bool = False,
        capturable: bool = False,
        compile: CompileConfig | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps}, stochastic_rounding, capturable)
        self._fp32_update = rowwise_adagrad_fp32 if compile is None else compile_function(rowwise_adagrad_fp32, compile)

    def _fused(self, p, state, group) -> bool:
        """A float32 table: the whole update is :func:`rowwise_adagrad_fp32`, compiled with ``compile``."""
        if p.dtype != torch.float32:
            return False
        if "sum" not in state:
            state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        lr = group["lr"]
        if not torch.is_tensor(lr):  # a tensor, so that a schedule's new value is not a new compiled version
            lr = torch.tensor(float(lr), dtype=torch.float32, device=p.device)
        self._fp32_update(p.grad._indices()[0], p.grad._values(), p, state["sum"], lr, group["eps"])
        return True

    def _update(self, p, state, group, rows, grad, weight):
        if "sum" not in state:
            state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        accum = state["sum"].index_select(0, rows) + grad.pow(2).mean(1)
        state["sum"].index_copy_(0, rows, accum)
        return weight - group["lr"] * grad / (accum.sqrt() + group["eps"]).unsqueeze(1)


class LazyAdam(_RowSparseOptimizer):
    """Sparse ("lazy") Adam: the moments of a row are updated only when the row is in the batch.

    With one step counter ``t`` per table (incremented at every step that has a gradient), for every row r in
    the batch with summed gradient ``g_r``::

        m_r <- b1 m_r + (1 - b1) g_r;   v_r <- b2 v_r + (1 - b2) g_r ** 2
        w_r <- w_r - lr * (m_r / (1 - b1 ** t)) / (sqrt(v_r / (1 - b2 ** t)) + eps)

    Rows absent from the batch: ``w_r``, ``m_r``, ``v_r`` unchanged. Dense Adam differs there: it decays
    ``m_r`` and ``v_r`` at every step and keeps moving an absent row by its momentum; lazy Adam equals dense
    Adam only when every row is in every batch. (This is ``torch.optim.SparseAdam``'s rule, without its
    per-element dense state layout restriction.) The state is two float32 tables ``[N, D]``: lazy Adam saves the
    compute of dense Adam, not its memory — use :class:`RowwiseAdagrad` when the state must not triple the table.
    Its step counter lives on the host, so a step with lazy Adam is not captured in a CUDA graph (eager step).
    """

    graph_safe = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        stochastic_rounding: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps}, stochastic_rounding, capturable)

    def _update(self, p, state, group, rows, grad, weight):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["step"] += 1
        t = float(state["step"])
        b1, b2 = group["betas"]
        m = state["exp_avg"].index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
        return weight - group["lr"] * (m / (1 - b1**t)) / denom


SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowwiseAdagrad, "lazy_adam": LazyAdam}


class DenseAndSparse(torch.optim.Optimizer):
    """Two optimisers as one: ``dense`` (fused Adam over the model but its embedding table) and ``sparse`` (a
    row-wise optimiser over the table), so that the step, the learning-rate schedule and the checkpoints see
    one optimizer.

    ``param_groups`` are the two optimisers' own groups (the dense ones first), so a schedule scales both
    learning rates; ``step`` and ``zero_grad`` run both; ``state_dict`` numbers the parameters on, the dense
    optimizer's first, and ``load_state_dict`` splits such a dict back (a checkpoint holds both states).
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense, self.sparse = dense, sparse
        params = [p for o in (dense, sparse) for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = dense.param_groups + sparse.param_groups  # the same dicts: a schedule reaches both

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.dense.step()
        self.sparse.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.sparse.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        dense, sparse = self.dense.state_dict(), self.sparse.state_dict()
        offset = sum(len(g["params"]) for g in dense["param_groups"])
        groups = dense["param_groups"] + [
            {**g, "params": [i + offset for i in g["params"]]} for g in sparse["param_groups"]
        ]
        state = {**dense["state"], **{i + offset: v for i, v in sparse["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        count = len(self.dense.param_groups)
        groups = state_dict["param_groups"]
        offset = sum(len(g["params"]) for g in groups[:count])
        state = {int(i): v for i, v in state_dict["state"].items()}
        self.dense.load_state_dict(
            {"state": {i: v for i, v in state.items() if i < offset}, "param_groups": groups[:count]}
        )
        sparse_groups = [{**g, "params": [i - offset for i in g["params"]]} for g in groups[count:]]
        sparse_state = {i - offset: v for i, v in state.items() if i >= offset}
        self.sparse.load_state_dict({"state": sparse_state, "param_groups": sparse_groups})
        self.param_groups = self.dense.param_groups + self.sparse.param_groups
