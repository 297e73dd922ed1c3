"""TorchRec as the sharding engine for embedding tables that outgrow one device (the ``mtrank[torchrec]`` extra).

A :class:`~mtrank.model.MultiTaskModel` keeps every categorical feature in one ``[sum(vocab), D]`` table
(``FeatureEmbedding``). :class:`TorchRecModel` is the same model with that table split into one TorchRec
table per feature inside an ``EmbeddingBagCollection`` fed a ``KeyedJaggedTensor``; the dense part (experts,
gates, towers) is the model's own modules, shared, not copied. :func:`shard` wraps it in
``DistributedModelParallel`` with the planner restricted to table-wise or column-wise sharding;
:func:`save_sharded` / :func:`load_sharded` write and read a ``torch.distributed.checkpoint`` directory
(each rank its own shards) that reloads at any world size; :func:`to_unsharded` writes the tables back into
the plain model, which exports and serves unchanged.

Gradients: each rank feeds its own batch and backpropagates its own mean loss; the dense parameters get
the average of the ranks' gradients (DDP) and the tables too (TorchRec divides the pooled gradients by the
world size), so a step at world size W equals one process's step on the W batches together. The tables are
updated inside the backward (fbgemm's fused exact SGD at ``lr``); the dense part takes any torch optimizer.

Scope: models whose block reads the flat embedding (no mixer, PEPNet, STEM tables, bags, embedded numeric
columns or bias tower); anything else is refused with a one-line error. Tested on CPU (Gloo); the GPU
build of fbgemm was not available on the benchmark machine, so TorchRec on GPU is untested here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from mtrank.model import MultiTaskModel

SHARDING_TYPES = ("table_wise", "column_wise")
INSTALL = "pip install fbgemm-gpu-cpu==1.8.0 && pip install torchrec==1.8.0 --no-deps (see the Makefile)"


def torchrec_available() -> str | None:
    """None when TorchRec and fbgemm import, else the one-line reason (for skips and errors)."""
    try:
        import torchrec  # noqa: F401
        import torchrec.distributed.model_parallel  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure (missing module, fbgemm ABI) is the reason
        return f"torchrec is not usable ({type(error).__name__}: {error}); install it with: {INSTALL}"
    return None


def _require_torchrec() -> None:
    reason = torchrec_available()
    if reason is not None:
        raise ImportError(reason)


def _check_supported(model: MultiTaskModel) -> None:
    emb = model.embedding
    unsupported = {
        "a mixer, PEPNet or token reader": model.reads_tokens,
        "per-task tables (STEM)": model.tables > 1,
        "bags": len(emb.bags) > 0,
        "embedded numeric columns": emb.num_numeric_tokens > 0,
        "a bias tower": model.bias_tower is not None,
        "a feature subset (main_features)": model.select_main,
        "no categorical features": emb.table is None,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"TorchRec sharding: the model has {', '.join(found)}; set them off in the model config")


def feature_names(model: MultiTaskModel) -> list[str]:
    """The KeyedJaggedTensor key of each categorical column: ``f0, f1, ...`` in column order."""
    return [f"f{i}" for i in range(model.embedding.num_sparse)]


class TorchRecModel(nn.Module):
    """A :class:`MultiTaskModel` whose categorical table is a TorchRec ``EmbeddingBagCollection``.

    ``forward(dense [B, F_dense], features: KeyedJaggedTensor)`` -> task logits ``[B, K]``, equal to
    ``model(dense, sparse).task_logits`` for the same ids and weights. Build it with :meth:`from_model`.
    """

    def __init__(self, model: MultiTaskModel, device: torch.device | str = "cpu") -> None:
        super().__init__()
        _require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        _check_supported(model)
        emb = model.embedding
        vocab = torch.diff(torch.cat([emb.offsets.cpu(), torch.tensor([emb.table.num_embeddings])])).tolist()
        self.keys = feature_names(model)
        self.dim = emb.embedding_dim
        configs = [
            EmbeddingBagConfig(
                name=f"t_{key}",
                embedding_dim=self.dim,
                num_embeddings=int(rows),
                feature_names=[key],
                pooling=PoolingType.SUM,
            )
            for key, rows in zip(self.keys, vocab)
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device(device))
        self.embedding = emb  # the plain-column selection; its table is not used in forward
        self.block = model.block

    @classmethod
    def from_model(cls, model: MultiTaskModel) -> TorchRecModel:
        """The TorchRec form of ``model`` with its table's rows copied into the per-feature tables."""
        out = cls(model)
        with torch.no_grad():
            for key, start, rows in zip(out.keys, model.embedding.offsets.tolist(), out.vocab_sizes()):
                out.ebc.embedding_bags[f"t_{key}"].weight.copy_(model.embedding.table.weight[start : start + rows])
        return out

    def vocab_sizes(self) -> list[int]:
        return [bag.weight.shape[0] for bag in self.ebc.embedding_bags.values()]

    def forward(self, dense: torch.Tensor, features) -> torch.Tensor:
        per_feature = self.ebc(features).to_dict()  # a sharded collection may reorder its keys
        pooled = torch.cat([per_feature[key] for key in self.keys], 1)  # (B, F * D)
        plain = self.embedding.plain(dense).to(pooled.dtype)
        x = torch.cat([plain, pooled], 1) if self.embedding.num_plain else pooled
        task_logits, _, _ = self.block(x, None)
        return task_logits


def to_features(sparse: torch.Tensor, keys: list[str]):
    """``sparse [B, F]`` ids -> the ``KeyedJaggedTensor`` of one id per feature per row (key-major)."""
    _require_torchrec()
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if sparse.shape[1] != len(keys):
        raise ValueError(f"to_features: sparse has {sparse.shape[1]} columns, the model has {len(keys)} features")
    values = sparse.t().contiguous().flatten()
    lengths = torch.ones(values.numel(), dtype=torch.int32, device=sparse.device)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def plan(module: TorchRecModel, sharding_type: str, pg, lr: float = 0.1):
    """The planner's sharding plan with every table ``sharding_type`` (``table_wise`` / ``column_wise``),
    and the sharders it was made for (tables updated in backward by exact SGD at ``lr``)."""
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding type {sharding_type!r}: choose one of {SHARDING_TYPES}")
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    world = torch.distributed.get_world_size(pg)
    constraints = {
        f"t_{key}": ParameterConstraints(sharding_types=[sharding_type], compute_kernels=["fused"])
        for key in module.keys
    }
    sharders = [EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})]
    planner = EmbeddingShardingPlanner(topology=Topology(world, "cpu"), constraints=constraints)
    return planner.collective_plan(module, sharders, pg), sharders


def shard(module: TorchRecModel, sharding_type: str = "table_wise", lr: float = 0.1, pg=None):
    """``DistributedModelParallel`` over the default (or given) process group: tables sharded by the plan,
    the dense part data-parallel (DDP). Returns the wrapped model."""
    _require_torchrec()
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    pg = pg or torch.distributed.GroupMember.WORLD
    tables = {name: bag.weight.detach().clone() for name, bag in module.ebc.embedding_bags.items()}
    sharding_plan, sharders = plan(module, sharding_type, pg, lr)
    dmp = DistributedModelParallel(
        module,
        env=ShardingEnv.from_process_group(pg),
        device=torch.device("cpu"),
        plan=sharding_plan,
        sharders=sharders,
    )
    load_tables(dmp, tables)  # sharding initialises fresh tables: put the model's rows back
    return dmp


def load_tables(dmp: nn.Module, tables: dict[str, torch.Tensor]) -> None:
    """Copy full tables (``t_f0``: ``[rows, D]``, ...) into this rank's shards of them, in place."""
    with torch.no_grad():
        for name, tensor in dmp.state_dict().items():
            if "embedding_bags" not in name:
                continue
            full = tables[name.split("embedding_bags.")[1].split(".")[0]]
            if not hasattr(tensor, "local_shards"):
                tensor.copy_(full)
                continue
            for shard_ in tensor.local_shards():
                (row, col), (rows, cols) = shard_.metadata.shard_offsets, shard_.metadata.shard_sizes
                shard_.tensor.copy_(full[row : row + rows, col : col + cols])


def save_sharded(dmp: nn.Module, path: str | Path) -> None:
    """Every rank writes its own shards into ``path`` (a ``torch.distributed.checkpoint`` directory)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dmp.state_dict(), checkpoint_id=str(path))


def load_sharded(dmp: nn.Module, path: str | Path) -> None:
    """Read ``path`` into ``dmp`` in place, resharding to ``dmp``'s plan (any world size, any sharding type)."""
    import torch.distributed.checkpoint as dcp

    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: no sharded checkpoint (.metadata missing); write one with save_sharded")
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    dmp.load_state_dict(state)


def gather_tables(dmp: nn.Module) -> dict[str, torch.Tensor]:
    """Each table's full weight on every rank (a collective: call it on every rank)."""
    full = {}
    for name, tensor in dmp.state_dict().items():
        if "embedding_bags" not in name:
            continue
        key = name.split("embedding_bags.")[1].split(".")[0]
        if hasattr(tensor, "gather"):  # ShardedTensor: gather on rank 0, then broadcast
            rank = torch.distributed.get_rank()
            out = torch.empty(tensor.size()) if rank == 0 else None
            tensor.gather(dst=0, out=out)
            out = out if out is not None else torch.empty(tensor.size())
            torch.distributed.broadcast(out, 0)
            full[key] = out
        else:
            full[key] = tensor.detach().clone()
    return full


def to_unsharded(model: MultiTaskModel, tables: dict[str, torch.Tensor]) -> MultiTaskModel:
    """Write the TorchRec tables (``t_f0``, ...) back into ``model``'s one table, in place: the plain model,
    which exports and serves unchanged. The dense part is shared with the TorchRec model already."""
    emb = model.embedding
    with torch.no_grad():
        for i, start in enumerate(emb.offsets.tolist()):
            weight = tables[f"t_f{i}"]
            emb.table.weight[start : start + weight.shape[0]].copy_(weight)
    return model


def end_worker() -> None:
    """Destroy the process group, then end this worker process at once (``os._exit(0)``, streams flushed).

    Call it last in a process started by ``torch.multiprocessing.spawn``, after every file it writes is closed.
    With torchrec 1.8 / fbgemm-gpu-cpu 1.8 a finished worker aborts at interpreter exit in about one run of four
    ("terminate called without an active exception", SIGABRT, after its last line ran: seen in
    ``benchmarks/torchrec_sharding.py --quick`` and the 2-process tests), and ``spawn`` then fails the run; the
    work is complete by then, the teardown is what aborts, so it is skipped."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
