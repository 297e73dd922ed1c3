"""Input representation: categorical ids and dense features -> one input vector per row.

:class:`FeatureEmbedding` is the one embedding op: every categorical column in one table lookup, every embedded
numeric column in one batched op per kind (:class:`PiecewiseLinearEmbedding`, :class:`PeriodicEmbedding`), the
rest of the dense columns as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtrank.config.model import NumericEmbeddingConfig

# PLE's open bounds: the largest float32, not inf, so that the saved buffers pass the model directory's finiteness
# check (cast to float16 it becomes inf, which the clamp takes as well)
_UNBOUNDED = torch.finfo(torch.float32).max


def _per_column_linear(columns: int, width: int, dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weights ``[F, width, D]`` and biases ``[F, D]`` of F linear layers, each initialised as ``nn.Linear``
    (uniform in ``+-1 / sqrt(width)``)."""
    bound = 1.0 / math.sqrt(width)
    weight = nn.Parameter(torch.empty(columns, width, dim).uniform_(-bound, bound))
    bias = nn.Parameter(torch.empty(columns, dim).uniform_(-bound, bound))
    return weight, bias


def _linear_relu(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``ReLU(features[:, f] @ weight[f] + bias[f])`` for every column f at once: ``[B, F, W] -> [B, F, D]``."""
    out = torch.matmul(features.transpose(0, 1), weight.to(features.dtype))  # (F, B, W) @ (F, W, D) -> (F, B, D)
    return torch.relu(out.transpose(0, 1) + bias.to(features.dtype))  # (B, F, D)


class PiecewiseLinearEmbedding(nn.Module):
    """Piecewise-linear encoding (PLE) of F dense columns, then a linear layer and ReLU per column (Gorishniy
    et al., NeurIPS 2022, eq. 1 and the "PLE-LR" embedding).

    Column f with bin edges ``b_0 < ... < b_T``: ``e_t = (x - b_{t-1}) / (b_t - b_{t-1})`` clamped to
    ``[0, 1]``, except that the first bin has no lower and the last bin no upper bound (a value outside the
    training range extrapolates). Columns with fewer bins than the widest are padded with bins fixed at 0.
    The token is ``ReLU(e W_f + c_f)``.

    Shapes: ``dense [B, F_dense]`` -> ``[B, F, D]`` (the columns ``columns`` of ``dense``).

    Args:
        columns: the dense columns embedded.
        edges: each column's bin edges (ascending, at least 2).
        dim: D.

    Example:
        >>> ple = PiecewiseLinearEmbedding([0, 2], [[0.0, 1.0, 2.0], [-1.0, 1.0]], dim=4)
        >>> ple.encode(torch.tensor([[1.5, 9.0, 3.0]])).tolist()
        [[[1.0, 0.5], [2.0, 0.0]]]
        >>> ple(torch.randn(5, 3)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(self, columns: list[int], edges: list[list[float]], dim: int) -> None:
        super().__init__()
        bins = max(len(e) - 1 for e in edges)
        left, width = torch.zeros(len(columns), bins), torch.ones(len(columns), bins)
        lower, upper = torch.zeros(len(columns), bins), torch.zeros(len(columns), bins)  # padding: fixed at 0
        for f, column_edges in enumerate(edges):
            b = torch.tensor(column_edges, dtype=torch.float64)
            t = b.numel() - 1
            left[f, :t], width[f, :t] = b[:-1].float(), (b[1:] - b[:-1]).float()
            lower[f, :t], upper[f, :t] = 0.0, 1.0
            lower[f, 0], upper[f, t - 1] = -_UNBOUNDED, _UNBOUNDED
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long))
        for name, value in (("left", left), ("width", width), ("lower", lower), ("upper", upper)):
            self.register_buffer(name, value)  # from the config's fitted edges (saved with the weights too)
        self.weight, self.bias = _per_column_linear(len(columns), bins, dim)

    def encode(self, dense: torch.Tensor) -> torch.Tensor:
        """The encoding ``[B, F_dense] -> [B, F, T]``."""
        x = dense.index_select(1, self.columns).unsqueeze(-1)  # (B, F, 1)
        e = (x - self.left.to(x.dtype)) / self.width.to(x.dtype)  # (B, F, T)
        return torch.maximum(torch.minimum(e, self.upper.to(x.dtype)), self.lower.to(x.dtype))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return _linear_relu(self.encode(dense), self.weight, self.bias)


class PeriodicEmbedding(nn.Module):
    """Periodic embeddings of F dense columns (Gorishniy et al., NeurIPS 2022, section 3.3, "PLR"):
    ``v = [sin(2 pi c x), cos(2 pi c x)]`` with k learned frequencies ``c`` per column (initialised from
    ``N(0, sigma^2)``), then a linear layer and ReLU per column. A column with fewer frequencies than the widest
    has its extra ones fixed at 0 (they add a constant input, no frequency).

    Shapes: ``dense [B, F_dense]`` -> ``[B, F, D]``.

    Args:
        columns: the dense columns embedded.
        frequencies: k of each column.
        sigmas: the initial standard deviation of each column's frequencies.
        dim: D.

    Example:
        >>> PeriodicEmbedding([1], [8], [0.5], dim=4)(torch.randn(5, 2)).shape
        torch.Size([5, 1, 4])
    """

    def __init__(self, columns: list[int], frequencies: list[int], sigmas: list[float], dim: int) -> None:
        super().__init__()
        k = max(frequencies)
        mask = (torch.arange(k) < torch.tensor(frequencies).unsqueeze(1)).float()  # (F, k)
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long))
        self.register_buffer("mask", mask)
        self.frequencies = nn.Parameter(torch.randn(len(columns), k) * torch.tensor(sigmas).unsqueeze(1) * mask)
        self.weight, self.bias = _per_column_linear(len(columns), 2 * k, dim)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        x = dense.index_select(1, self.columns).unsqueeze(-1)  # (B, F, 1)
        angle = 2 * math.pi * x * (self.frequencies * self.mask).to(x.dtype)  # (B, F, k)
        return _linear_relu(torch.cat([torch.sin(angle), torch.cos(angle)], -1), self.weight, self.bias)


class FeatureEmbedding(nn.Module):
    """Embeds F categorical features with one table and one lookup, embeds the numeric columns that ask for it,
    and concatenates the other dense features.

    All categorical features share a single ``[sum(vocab_sizes), D]`` table; feature f's ids are shifted by
    ``offsets[f] = sum(vocab_sizes[:f])``, so the whole batch is embedded by one ``F.embedding`` call
    instead of one lookup per feature. Embedded numeric columns (``numeric``) become D-wide tokens too, all
    piecewise-linear ones in one batched op and all periodic ones in another; the other dense columns (plain
    numeric features, multi-hot blocks) enter as they are.

    Shapes: ``dense [B, F_dense]`` (float), ``sparse [B, F]`` (int64, ids in ``[0, vocab_f)``)
    -> ``[B, F_plain + T * D]`` with ``T`` tokens: ``[embedded numeric, categorical, bags]``.

    Multi-valued features (bags) are the last ``sum(bag_lengths)`` columns: bag b's ``bag_lengths[b]`` columns
    hold its values' ids, padded with the bag's last id; they share one slice of the table, and their
    embeddings are pooled (mean or sum over the non-padding ones) into one ``[B, D]`` token per bag, as
    ``nn.EmbeddingBag`` would, but inside the same single lookup.

    Args:
        num_dense: number of dense features.
        vocab_sizes: vocabulary size of each categorical column (a bag's columns: the bag's size, padding
            included).
        embedding_dim: D, the embedding width.
        bag_lengths / bag_pooling: columns and ``"mean"`` / ``"sum"`` of each bag (see ``ModelConfig``).
        numeric: the embedded dense columns (:class:`~mtrank.config.model.NumericEmbeddingConfig`).
        table_dtype: storage dtype of the table (:class:`EmbeddingTable`; a bf16 / fp16 table is initialised as
            the float32 one, then rounded); lookups are cast to the dense input's dtype.

    Example:
        >>> emb = FeatureEmbedding(num_dense=2, vocab_sizes=[10, 5], embedding_dim=4)
        >>> emb(torch.randn(3, 2), torch.tensor([[1, 0], [9, 4], [0, 2]])).shape
        torch.Size([3, 10])
        >>> ple = NumericEmbeddingConfig(column=1, type="ple", edges=[-1.0, 0.0, 1.0])
        >>> emb = FeatureEmbedding(num_dense=2, vocab_sizes=[10, 5], embedding_dim=4, numeric=[ple])
        >>> emb(torch.randn(3, 2), torch.tensor([[1, 0], [9, 4], [0, 2]])).shape  # 1 plain + 3 tokens of 4
        torch.Size([3, 13])
    """

    __constants__ = ["bags"]  # TorchScript unrolls the loop over this tuple

    def __init__(
        self,
        num_dense: int,
        vocab_sizes: list[int],
        embedding_dim: int,
        bag_lengths: list[int] | None = None,
        bag_pooling: list[str] | None = None,
        numeric: list[NumericEmbeddingConfig] | None = None,
        table_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        bag_lengths, bag_pooling, numeric = list(bag_lengths or []), list(bag_pooling or []), list(numeric or [])
        self.num_dense = num_dense
        self.num_sparse = len(vocab_sizes)
        self.num_single = len(vocab_sizes) - sum(bag_lengths)
        self.embedding_dim = embedding_dim
        ple = [n for n in numeric if n.type == "ple"]
        periodic = [n for n in numeric if n.type == "periodic"]
        self.numeric_embeddings = nn.ModuleList()
        if ple:
            columns = [n.column for n in ple]
            self.numeric_embeddings.append(PiecewiseLinearEmbedding(columns, [n.edges for n in ple], embedding_dim))
        if periodic:
            self.numeric_embeddings.append(
                PeriodicEmbedding(
                    [n.column for n in periodic],
                    [n.frequencies for n in periodic],
                    [n.sigma for n in periodic],
                    embedding_dim,
                )
            )
        embedded = {n.column for n in numeric}
        plain = [c for c in range(num_dense) if c not in embedded]
        self.num_plain = len(plain)
        self.select_plain = len(plain) != num_dense
        if self.select_plain:  # a buffer only when needed: a model without embedded columns keeps its weights
            self.register_buffer("plain_columns", torch.tensor(plain, dtype=torch.long))
        else:
            self.plain_columns = None
        self.num_numeric_tokens = len(numeric)
        self.num_tokens = len(numeric) + self.num_single + len(bag_lengths)
        self.output_dim = self.num_plain + self.num_tokens * embedding_dim
        # table offset of each column: singles one slice each; a bag's columns all point at the bag's slice
        column_offsets, rows = [], 0
        for size in vocab_sizes[: self.num_single]:
            column_offsets.append(rows)
            rows += int(size)
        bags = []  # (first column, columns, padding id, mean) of each bag
        start = self.num_single
        for length, pooling in zip(bag_lengths, bag_pooling):
            size = int(vocab_sizes[start])
            column_offsets += [rows] * length
            bags.append((start, length, size - 1, pooling == "mean"))
            rows += size
            start += length
        self.bags = tuple(bags)
        self.register_buffer("offsets", torch.tensor(column_offsets, dtype=torch.long))
        self.table = None
        if vocab_sizes:
            self.table = EmbeddingTable(rows, embedding_dim, sparse=False, init_std=0.05).to(table_dtype)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.num_tokens == 0:
            return dense
        tokens = self.tokens(dense, sparse).flatten(1)  # (B, T, D) -> (B, T*D)
        if self.num_plain == 0:
            return tokens
        return torch.cat([self.plain(dense).to(tokens.dtype), tokens], dim=1)  # (B, F_plain + T*D)

    def plain(self, dense: torch.Tensor) -> torch.Tensor:
        """The dense columns that enter as they are: ``[B, F_dense] -> [B, F_plain]``."""
        if self.plain_columns is None:
            return dense
        return dense.index_select(1, self.plain_columns)

    def tokens(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Every token, ``[B, T, D]``: the embedded numeric columns, then the categorical features and bags."""
        if self.num_numeric_tokens == 0:
            return self.embed(sparse, dense.dtype)  # (B, F, D)
        parts = [module(dense) for module in self.numeric_embeddings]  # (B, F_kind, D) each
        if self.table is not None:
            emb = self.embed(sparse, dense.dtype)
            parts = [part.to(emb.dtype) for part in parts] + [emb]
        return torch.cat(parts, 1)  # (B, T, D)

    def embed(self, sparse: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-feature embeddings ``[B, F] -> [B, tokens, D]`` (one lookup for all features; bags pooled), in
        ``dtype`` (the dense input's: a bf16 / fp16 table is storage, not the model's compute dtype)."""
        table = self.table
        if table is None:
            return torch.zeros(sparse.shape[0], 0, self.embedding_dim, device=sparse.device, dtype=dtype)
        emb = table(sparse + self.offsets).to(dtype)  # (B, F, D)
        if len(self.bags) == 0:
            return emb
        tokens = [emb[:, : self.num_single]]
        for start, length, pad, mean in self.bags:
            keep = (sparse[:, start : start + length] != pad).to(emb.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (emb[:, start : start + length] * keep).sum(1, keepdim=True)  # (B, 1, D)
            if mean:
                pooled = pooled / keep.sum(1, keepdim=True).clamp_min(1.0)
            tokens.append(pooled)
        return torch.cat(tokens, 1)


# --- Big tables: hashed ids, reduced-precision storage, sparse gradients --------------------------------------------


def hash_ids(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """Raw int64 ids (any value, an unbounded id space) -> bucket in ``[0, buckets)``: a splitmix64-style mix
    (int64 products wrap) then modulo, so consecutive ids spread over the table."""
    # literals, not module constants, so that TorchScript compiles it: splitmix64's multipliers 0x9E3779B97F4A7C15
    # and 0xBF58476D1CE4E5B9 as signed int64; the masks make the right shifts logical (2**35 - 1, 2**32 - 1)
    x = ids.long() * -7046029254386353131
    x = x ^ ((x >> 29) & 34359738367)
    x = x * -4658895280553007687
    x = x ^ ((x >> 32) & 4294967295)
    return x.remainder(buckets)


def expected_collision_rate(distinct_ids: int, buckets: int) -> float:
    """Fraction of ``n`` distinct ids that share their bucket with at least one other id, for a uniform hash into
    ``m`` buckets: ``1 - (1 - 1/m) ** (n - 1)`` (~ ``1 - exp(-n/m)``; ~ ``n/m`` when n << m)."""
    return 1.0 - math.exp((distinct_ids - 1) * math.log1p(-1.0 / buckets))


def measured_collision_rate(ids: torch.Tensor, buckets: int) -> float:
    """The fraction of the distinct ``ids`` whose bucket (:func:`hash_ids`) holds another of them."""
    distinct = torch.unique(ids.long())
    _, inverse, counts = torch.unique(hash_ids(distinct, buckets), return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


class EmbeddingTable(nn.Embedding):
    """One big embedding table ``[rows, dim]``: optionally hashed ids, bfloat16/float16 storage and sparse
    gradients (for :class:`~mtrank.train.optim.RowwiseAdagrad` / :class:`~mtrank.train.optim.LazyAdam`).

    An ``nn.Embedding`` (same ``weight``, ``num_embeddings``, ``sparse`` attribute and state dict) whose ids may
    be raw values of an unbounded space and whose initialisation is ``N(0, init_std^2)``.

    Shapes: ``ids [...]`` (int64) -> ``[..., dim]`` in the table's dtype.

    Args:
        rows: rows of the table (with ``hashed``, the number of buckets).
        dim: embedding width.
        dtype: storage dtype (the optimisers compute in float32 and write back in this dtype).
        hashed: ids are raw values of an unbounded space, mapped by :func:`hash_ids`; otherwise ids must lie in
            ``[0, rows)``.
        sparse: the gradient is a sparse tensor holding only the rows of the batch (the trainer sets it when
            ``train.sparse`` names a row-wise optimiser).
        device: where the table is created and initialised (a 50 GB table is not built on the host first).
        init_std: standard deviation of the initial weights; default ``1 / sqrt(dim)``.

    Example:
        >>> t = EmbeddingTable(1000, 8, hashed=True)
        >>> t(torch.tensor([[3, 10**15]])).shape
        torch.Size([1, 2, 8])
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        hashed: bool = False,
        sparse: bool = True,
        device: torch.device | str | None = None,
        init_std: float | None = None,
    ) -> None:
        # nn.Embedding draws N(0, 1) first: kept, so that a model's later modules draw what they always drew
        super().__init__(rows, dim, sparse=sparse, device=device, dtype=dtype)
        self.rows, self.dim, self.hashed = rows, dim, hashed
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim) if init_std is None else init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = hash_ids(ids, self.rows) if self.hashed else ids
        if self.sparse and not torch.jit.is_scripting():
            return _ContiguousGrad.apply(_sparse_lookup(rows, self.weight))
        return nn.functional.embedding(rows, self.weight, sparse=self.sparse)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient.

    The lookup's output is a slice of the block input (``cat([plain, tokens])``, padded), so its gradient is a
    strided view starting at an unaligned column; the sparse embedding backward then copies it, outside the
    compiled region, with PyTorch's generic strided kernel (3.4 ms of W3's 35 ms step on an H200). Inside the
    compiled region (``train.compile``) this copy is one more output of the fused kernel that makes the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


@torch.compiler.disable
def _sparse_lookup(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The lookup with a sparse gradient, left out of ``torch.compile`` (``train.compile``): inductor cannot
    trace a sparse tensor; the model around it is compiled, with a graph break here."""
    return nn.functional.embedding(rows, weight, sparse=True)
