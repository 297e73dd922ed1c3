"""Memory planning for big embedding tables: before training, does the model fit the device?

The plan counts, per table, the weights (rows x dim x bytes of the storage dtype), the gradient and the
optimiser state, plus the activations of a batch; it compares the total with the free memory of the device and,
when it does not fit, refuses with one line that names the largest table and what to change.

Bytes per table of ``N`` rows and width ``D`` (storage ``s`` = 4 float32, 2 bf16/fp16 bytes):

=================  ==================  =======================================================================
optimizer          state               gradient
=================  ==================  =======================================================================
adam (dense)       ``2 N D x 4``       ``N D s`` (a dense gradient the size of the table)
lazy_adam          ``2 N D x 4``       ``B F D (s + 8) + B F (4 D + 48)`` (sparse: values + int64 indices, batch
                                       rows only; then the update's fixed-shape sums: ``summed_rows``)
rowwise_adagrad    ``N x 4``           as lazy_adam
=================  ==================  =======================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mtrank.config import ModelConfig, TrainConfig
from mtrank.model import MultiTaskModel

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adam", "lazy_adam", "rowwise_adagrad")
GB = 1e9


@dataclass
class TableSpec:
    name: str
    rows: int
    dim: int
    dtype: str = "float32"
    lookups: int = 1  # ids per sample looked up in this table


@dataclass
class MemoryPlan:
    """Bytes by item (``"table item_id: weights"`` -> bytes) and the verdict against ``free_bytes``."""

    items: dict[str, int] = field(default_factory=dict)
    free_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.free_bytes

    def table(self) -> str:
        lines = [f"{name:<44} {size / GB:>9.2f} GB" for name, size in self.items.items()]
        lines.append(f"{'total':<44} {self.total / GB:>9.2f} GB  (free {self.free_bytes / GB:.2f} GB)")
        return "\n".join(lines)


def table_bytes(table: TableSpec, optimizer: str, batch_size: int) -> dict[str, int]:
    """Weights, gradient and optimiser state of one table (see the module's table)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {optimizer!r}, choose one of {', '.join(OPTIMIZERS)}")
    if table.dtype not in BYTES:
        raise ValueError(f"table {table.name}: dtype {table.dtype!r} unknown, choose one of {', '.join(BYTES)}")
    s, n, d = BYTES[table.dtype], table.rows, table.dim
    lookups = batch_size * table.lookups  # the sparse gradient and the update have one row per lookup (fixed shape)
    grad = n * d * s if optimizer == "adam" else lookups * d * (s + 8) + lookups * (4 * d + 48)
    state = n * 4 if optimizer == "rowwise_adagrad" else 2 * n * d * 4
    return {"weights": n * d * s, "gradient": grad, f"{optimizer} state": state}


def plan_memory(
    tables: list[TableSpec],
    optimizer: str,
    batch_size: int,
    free_bytes: int,
    dense_params: int = 0,
    activation_bytes_per_sample: int = 0,
) -> MemoryPlan:
    """The plan: every table's bytes, the dense parameters with Adam (weights, gradient, 2 moments: 16 bytes
    each) and the activations of a batch (``activation_bytes_per_sample`` x ``batch_size``; the lookups'
    outputs and their gradients are counted here, ``2 x lookups x dim x 4`` bytes per sample per table)."""
    plan = MemoryPlan(free_bytes=free_bytes)
    for t in tables:
        for item, size in table_bytes(t, optimizer, batch_size).items():
            plan.items[f"table {t.name}: {item}"] = size
    plan.items["dense parameters + Adam"] = 16 * dense_params
    lookups = sum(2 * t.lookups * t.dim * 4 for t in tables)
    plan.items[f"activations at batch {batch_size}"] = batch_size * (activation_bytes_per_sample + lookups)
    return plan


def refusal(plan: MemoryPlan, tables: list[TableSpec], optimizer: str) -> str | None:
    """``None`` when the plan fits, else one line naming the largest table, the total against the free memory
    and what to change (the changes that would make it fit first)."""
    if plan.fits:
        return None
    big = max(tables, key=lambda t: t.rows * t.dim)
    fixes = []
    if optimizer != "rowwise_adagrad":
        fixes.append("train.sparse: rowwise_adagrad")
    if big.dtype == "float32":
        fixes.append("model.inputs.table_dtype: bf16")
    fixes.append(f"fewer rows for table {big.name} (its hash_buckets / max_vocab)")
    return (
        f"table {big.name}: {big.rows / 1e6:g}M x {big.dim} x {big.dtype} + {optimizer} state: "
        f"plan {plan.total / GB:.3g} GB > {plan.free_bytes / GB:.3g} GB free: use " + " or ".join(fixes)
    )


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM (``/proc/meminfo``) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class MemoryPlanError(RuntimeError):
    """Raised before training when the plan does not fit: its message is the one line of :func:`refusal`."""


def check_fits(plan: MemoryPlan, tables: list[TableSpec], optimizer: str) -> None:
    line = refusal(plan, tables, optimizer)
    if line is not None:
        raise MemoryPlanError(line)


TABLE_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # inputs.table_dtype -> BYTES


def model_tables(config: ModelConfig) -> list[TableSpec]:
    """The categorical table of a model as one :class:`TableSpec` per feature (its slice of the one table):
    a single column's vocabulary, looked up once per sample; a bag's vocabulary, looked up ``length`` times.
    STEM's table is ``K + 1`` embeddings wide."""
    inputs, main = config.inputs, config.main_features
    sizes = [inputs.vocab_sizes[i] for i in main]
    singles = len(sizes) - sum(inputs.bag_lengths)
    width = inputs.embedding_dim * (config.num_tasks + 1 if config.block.type == "stem" else 1)
    dtype = TABLE_DTYPE_NAMES[inputs.table_dtype]
    names = [inputs.names[i] if i < len(inputs.names) else f"column {i}" for i in main[:singles]]
    tables = [TableSpec(name, int(size), width, dtype) for name, size in zip(names, sizes[:singles])]
    start = singles
    for b, length in enumerate(inputs.bag_lengths):
        tables.append(TableSpec(f"bag {b}", int(sizes[start]), width, dtype, lookups=length))
        start += length
    return tables


def plan_training(config: ModelConfig, train: TrainConfig, free_bytes: int) -> tuple[MemoryPlan, str]:
    """The plan of training a model of ``config`` with ``train``: its tables (:func:`model_tables`) under
    ``train.sparse`` (dense: Adam), the rest of its parameters with Adam (counted on the same model built with
    2-row vocabularies, which allocates nothing big), and per sample the block input and its gradient
    (float32); returns the plan and the optimizer name it used."""
    inputs, main = config.inputs, set(config.main_features)
    small_sizes = [2 if i in main else size for i, size in enumerate(inputs.vocab_sizes)]
    small = MultiTaskModel(dataclasses.replace(config, inputs=dataclasses.replace(inputs, vocab_sizes=small_sizes)))
    table_ids = {id(p) for p in small.embedding_tables()}
    dense_params = sum(p.numel() for p in small.parameters() if id(p) not in table_ids)
    optimizer = train.sparse.optimizer if train.sparse.enabled else "adam"
    activation = 2 * 4 * config.input_dim
    plan = plan_memory(model_tables(config), optimizer, train.batch_size, free_bytes, dense_params, activation)
    return plan, optimizer


def check_training_fits(config: ModelConfig, train: TrainConfig, device: torch.device) -> MemoryPlan:
    """Before the model is built: plan its training on ``device`` (:func:`plan_training`) and raise
    :class:`MemoryPlanError` (one line: the largest table, the sizes, what to change) when it does not fit in
    the device's free memory."""
    plan, optimizer = plan_training(config, train, free_device_bytes(device))
    tables = model_tables(config)
    if tables:
        check_fits(plan, tables, optimizer)
    elif not plan.fits:
        raise MemoryPlanError(
            f"the model's parameters: plan {plan.total / GB:.3g} GB > {plan.free_bytes / GB:.3g} GB free"
        )
    return plan
