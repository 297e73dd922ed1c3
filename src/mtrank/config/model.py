"""The model's configuration, one section per concern.

==============  ==========================================================================================
``inputs``      dense features, categorical vocabularies, embedding width, multi-valued bags
``tasks``       name, ``binary`` / ``regression``, loss weight
``block``       how experts are shared (below), how many, PLE levels, a shared hidden layer under them
``experts``     the expert type (registered: ``mlp``, ``dcn``, ``home``) and its options
``gate``        the gate type (registered: ``softmax``, ``topk``, ``dselect_k``) and its options
``towers``      each task's tower
``pepnet``      PEPNet's embedding (EPNet) and tower (PPNet) gates, conditioned on chosen features
``mixer``       a transformer over the feature tokens (Pinterest Closeup)
``bias``        YouTube's shallow tower for position / selection bias
``funnel``      how tasks that depend on another (click -> conversion) are trained: ESMM, ESCM2, AITM
==============  ==========================================================================================

Blocks (one mechanism, many configurations; see :mod:`mtrank.nn.routing`):

================  =========================================================================
``single_task``   one bottom per task, no sharing (K experts, task k sees only expert k)
``shared_bottom`` one bottom shared by every task (1 expert, every gate fixed to it)
``omoe``          one softmax gate over E shared experts, the same for all tasks
``mmoe``          one softmax gate per task over E shared experts (Ma et al., 2018)
``cgc``           per-task experts plus shared experts; task k's gate sees its own + shared (Tang et al., 2020)
``ple``           ``levels`` stacked CGC levels, with a shared gate feeding the next level's shared experts
``adatt``         per-task + shared experts, every gate fuses all of them, plus each task's own experts as a
                  residual; ``levels`` stacked (AdaTT-sp, Li et al., 2023)
``home``          two levels: task-group (meta) experts, then task experts; group masks, self-gates
                  (HoME, Wang et al., 2024; with ``experts: home`` for its normalised Swish experts)
``stem``          per-task + shared embedding tables; task k's gate fuses every expert, other tasks' experts
                  without gradient (STEM, Su et al., 2024)
================  =========================================================================

Example:
    >>> config = ModelConfig(inputs={"num_dense": 100}, block="mmoe", experts={"hidden": [16]})
    >>> config.block.num_experts, config.experts.type, config.gate.type, config.input_dim
    (8, 'mlp', 'softmax', 100)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mtrank.config.base import Config, Registry, check, did_you_mean, join

LABEL_TRANSFORMS = ("none", "standardize", "log1p", "log1p_standardize")
LabelTransform = Literal["none", "standardize", "log1p", "log1p_standardize"]
BLOCKS = ("single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "adatt", "home", "stem")
BlockType = Literal["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "adatt", "home", "stem"]
OWN_EXPERT_BLOCKS = ("cgc", "ple", "adatt", "home", "stem")  # blocks whose gates have experts of their own
Activation = Literal["relu", "gelu", "silu"]

# the flat fields of mtrank 0.1's ModelConfig and where each lives now (model directories of format 1 are read
# through :func:`nest_flat_model`)
FLAT_FIELDS = (
    "num_dense", "vocab_sizes", "embedding_dim", "bag_lengths", "bag_pooling", "num_experts", "task_experts",
    "levels", "shared_hidden", "expert_hidden", "expert_type", "cross_layers", "cross_rank", "activation",
    "dropout", "tower_hidden", "mixer_layers", "mixer_heads", "bias_features", "bias_hidden", "bias_dropout",
    "bias_tasks",
)  # fmt: skip
NESTED_FIELDS = (
    "inputs.num_dense", "inputs.vocab_sizes", "inputs.embedding_dim", "inputs.bags", "inputs.bags",
    "block.num_experts", "block.task_experts", "block.levels", "block.shared_hidden", "experts.hidden",
    "experts.type", "experts.cross_layers", "experts.cross_rank", "experts.activation and towers.activation",
    "experts.dropout and towers.dropout", "towers.hidden", "mixer.layers", "mixer.heads", "bias.features",
    "bias.hidden", "bias.dropout", "bias.tasks",
)  # fmt: skip

EXPERTS = Registry("expert type")
GATES = Registry("gate type")


def _widths(widths: list[int], path: str) -> None:
    for i, width in enumerate(widths):
        check(width >= 1, f"{path}[{i}]", f"layer width must be >= 1, got {width}")


@dataclass
class TaskConfig(Config):
    """One prediction task.

    Args:
        name: task name, used in metrics, reports and exports.
        type: ``"binary"`` (logits, BCE-with-logits) or ``"regression"`` (MSE).
        weight: weight of this task's loss in the total loss (with ``depends_on`` and a ``funnel``: of its
            entire-space loss, e.g. ESMM's CTCVR loss).
        depends_on: the task this one follows in a funnel (``cvr`` depends on ``ctr``): its label exists only
            where the parent's label is 1 and its score is the conditional probability (pCVR); the product of
            the chain's scores is the entire-space probability (pCTCVR). See :class:`FunnelConfig`.
        weight: weight of this task's loss in the total loss.
        label_transform: a regression task's labels as the model learns them (:data:`LABEL_TRANSFORMS`); its
            output ``z`` is mapped back to the labels' own scale in the model's scores (and so in every export):
            ``y = z * label_std + label_mean``, then ``sign(y) expm1(|y|)`` for the ``log1p`` transforms.
        label_mean / label_std: the fitted statistics of the transformed training labels (``standardize``).
    """

    shorthand: ClassVar[str] = "name"
    name: str
    type: Literal["binary", "regression"] = "binary"
    weight: float = 1.0
    label_transform: LabelTransform = "none"
    label_mean: float = 0.0
    label_std: float = 1.0
    depends_on: str = ""

    def check(self, path: str) -> None:
        check(self.name != "", join(path, "name"), "must be a non-empty string")
        check(0 <= self.weight < math.inf, join(path, "weight"), f"must be >= 0 and finite, got {self.weight}")
        check(self.depends_on != self.name, join(path, "depends_on"), f"task {self.name!r} cannot depend on itself")
        check(
            self.type == "regression" or self.label_transform == "none",
            join(path, "label_transform"),
            f"{self.label_transform!r} is for regression tasks; a binary task's labels stay 0/1",
        )
        check(math.isfinite(self.label_mean), join(path, "label_mean"), f"must be finite, got {self.label_mean}")
        check(0 < self.label_std < math.inf, join(path, "label_std"), f"must be > 0 and finite, got {self.label_std}")


@dataclass
class BagConfig(Config):
    """A multi-valued categorical feature embedded as a bag (DeepCTR's VarLenSparseFeat).

    Args:
        length: id columns of the bag (values kept per row; padded with the bag's last id).
        pooling: ``"mean"`` or ``"sum"`` of the non-padding values' embeddings.
    """

    length: int
    pooling: Literal["mean", "sum"] = "mean"

    def check(self, path: str) -> None:
        check(self.length >= 1, join(path, "length"), f"must be >= 1, got {self.length}")


@dataclass
class SequenceConfig(Config):
    """A user action sequence (:class:`mtrank.nn.sequence.SequenceEncoder`), derived from the feature's spec
    and fitted encoder: ``length`` item-id columns (left-padded with ``vocab_size - 1``), then ``length`` action-id
    columns when ``actions`` > 0 (padded with ``actions - 1``), then ``length`` age-bucket columns when ``times`` >
    0 (padded with ``times - 1``), after the bags' columns.

    Args:
        length: items per row (the most recent kept).
        vocab_size: item ids ``[0, vocab_size)``, the last one padding (0 = unseen).
        actions: action ids ``[0, actions)``, the last one padding; 0 = no actions.
        times: age buckets ``[0, times)``, the last one padding (or unknown); 0 = no times.
        target: the categorical column (index) of the candidate item, in the same id space; -1 = none.
        layers / heads: transformer layers over the sequence (0 = none), attention heads.
        pooling: ``mean`` over the encoded items or ``target`` (attention from the candidate, DIN).
    """

    length: int
    vocab_size: int
    actions: int = 0
    times: int = 0
    target: int = -1
    layers: int = 1
    heads: int = 2
    pooling: Literal["mean", "target"] = "mean"

    @property
    def column_sizes(self) -> list[int]:
        """The vocabulary of each of its columns: items, then actions and age buckets when present."""
        return [size for size in (self.vocab_size, self.actions, self.times) if size for _ in range(self.length)]

    @property
    def columns(self) -> int:
        return len(self.column_sizes)

    def check(self, path: str) -> None:
        check(self.length >= 1, join(path, "length"), f"must be >= 1, got {self.length}")
        check(self.vocab_size >= 2, join(path, "vocab_size"), f"must be >= 2 (ids + padding), got {self.vocab_size}")
        check(self.actions == 0 or self.actions >= 2, join(path, "actions"), f"must be 0 or >= 2, got {self.actions}")
        check(self.times == 0 or self.times >= 2, join(path, "times"), f"must be 0 or >= 2, got {self.times}")
        check(self.layers >= 0, join(path, "layers"), f"must be >= 0, got {self.layers}")
        check(self.heads >= 1, join(path, "heads"), f"must be >= 1, got {self.heads}")
        check(self.pooling != "target" or self.target >= 0, join(path, "target"), "pooling 'target' needs a column")


@dataclass
class NumericEmbeddingConfig(Config):
    """One dense column embedded as a ``D``-wide token (Gorishniy et al., NeurIPS 2022, "On Embeddings for
    Numerical Features in Tabular Deep Learning"), derived from the feature's ``embedding`` and fitted encoder.

    Args:
        column: index of the column in the dense input.
        type: ``ple``: piecewise-linear encoding over the bins ``edges`` (T bins, T + 1 ascending edges in the
            encoded scale), then a linear layer and ReLU; ``periodic``: ``[sin(2 pi c x), cos(2 pi c x)]`` for
            ``frequencies`` learned ``c`` (initialised from N(0, sigma^2)), then a linear layer and ReLU.
        edges: ``ple``: the bin edges.
        frequencies / sigma: ``periodic``: how many frequencies, their initial standard deviation.
    """

    column: int
    type: Literal["ple", "periodic"] = "ple"
    edges: list[float] = field(default_factory=list)
    frequencies: int = 16
    sigma: float = 1.0

    def check(self, path: str) -> None:
        check(self.column >= 0, join(path, "column"), f"must be >= 0, got {self.column}")
        if self.type == "ple":
            edges = self.edges
            ok = len(edges) >= 2 and all(math.isfinite(e) for e in edges)
            ok = ok and all(a < b for a, b in zip(edges, edges[1:]))
            check(ok, join(path, "edges"), f"expected >= 2 finite, strictly ascending bin edges, got {edges[:8]!r}")
        check(self.frequencies >= 1, join(path, "frequencies"), f"must be >= 1, got {self.frequencies}")
        check(0 < self.sigma < math.inf, join(path, "sigma"), f"must be > 0 and finite, got {self.sigma}")


@dataclass
class InputsConfig(Config):
    """What the model reads.

    Args:
        num_dense: number of dense (numeric) input features.
        vocab_sizes: vocabulary size of each categorical column (ids in ``[0, vocab)``); the bags' columns last.
        embedding_dim: embedding width of every categorical feature.
        bags: the multi-valued features, in the order of their columns (the last ``sum(length)`` columns of
            ``vocab_sizes``; all columns of a bag have its vocabulary size, whose last id is padding).
        numeric: dense columns embedded as tokens of ``embedding_dim`` (the rest enter the block as they are).
        names: names of the single categorical columns, in order (filled from an experiment's features), so
            that sections such as ``pepnet`` may name features; empty = refer to them by index.
        pad_to: the block input's width rounded up to a multiple of this with zero columns (1: as it is). On a
            GPU a width that is a multiple of 8 (bf16) or 64 lets the first GEMMs use aligned tensor-core
            kernels; the model computes the same function (the zero columns only meet weights whose gradient
            is zero).
        table_dtype: storage dtype of the categorical embedding table: ``fp32``, ``bf16`` or ``fp16`` (half the
            bytes; lookups are computed in the model's dtype, updates in float32: see ``train.sparse``).
        sequences: user action sequences, each one token (their columns last, after the bags').
    """

    num_dense: int = 0
    vocab_sizes: list[int] = field(default_factory=list)
    embedding_dim: int = 16
    bags: list[BagConfig] = field(default_factory=list)
    numeric: list[NumericEmbeddingConfig] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pad_to: int = 1
    table_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    sequences: list[SequenceConfig] = field(default_factory=list)

    @property
    def sequence_columns(self) -> int:
        """The sequences' columns, the last ones of ``vocab_sizes``."""
        return sum(seq.columns for seq in self.sequences)

    @property
    def first_bag_column(self) -> int:
        return len(self.vocab_sizes) - sum(self.bag_lengths) - self.sequence_columns

    @property
    def bag_lengths(self) -> list[int]:
        return [bag.length for bag in self.bags]

    @property
    def bag_pooling(self) -> list[str]:
        return [bag.pooling for bag in self.bags]

    def check(self, path: str) -> None:
        check(self.num_dense >= 0, join(path, "num_dense"), f"must be >= 0, got {self.num_dense}")
        check(self.pad_to >= 1, join(path, "pad_to"), f"must be >= 1 (1: no padding), got {self.pad_to}")
        for i, size in enumerate(self.vocab_sizes):
            check(size >= 1, f"{join(path, 'vocab_sizes')}[{i}]", f"must be >= 1, got {size}")
        columns = [n.column for n in self.numeric]
        for i, column in enumerate(columns):
            where = f"{join(path, 'numeric')}[{i}].column"
            check(column < self.num_dense, where, f"dense column {column} does not exist (num_dense={self.num_dense})")
            check(column not in columns[:i], where, f"dense column {column} is embedded twice")
        if self.vocab_sizes or self.numeric:
            check(self.embedding_dim >= 1, join(path, "embedding_dim"), f"must be >= 1, got {self.embedding_dim}")
        first = self.first_bag_column
        check(
            first >= 0,
            join(path, "bags"),
            f"the bags and sequences take {sum(self.bag_lengths) + self.sequence_columns} columns; vocab_sizes "
            f"has {len(self.vocab_sizes)}",
        )
        start = first
        for b, bag in enumerate(self.bags):
            sizes = set(self.vocab_sizes[start : start + bag.length])
            check(
                len(sizes) == 1 and min(sizes) >= 2,
                f"{join(path, 'bags')}[{b}]",
                f"the bag's columns {start}..{start + bag.length - 1} need one vocabulary size >= 2 (ids + "
                f"padding), got {sorted(sizes)}",
            )
            start += bag.length
        for q, seq in enumerate(self.sequences):
            where = f"{join(path, 'sequences')}[{q}]"
            check(
                self.vocab_sizes[start : start + seq.columns] == seq.column_sizes,
                where,
                f"columns {start}..{start + seq.columns - 1} of vocab_sizes do not match the sequence's sizes",
            )
            check(
                seq.target < self.first_bag_column,
                f"{where}.target",
                f"column {seq.target} is not a single categorical column",
            )
            check(
                seq.target < 0 or self.vocab_sizes[seq.target] <= seq.vocab_size - 1,
                f"{where}.target",
                f"the target's ids [0, {self.vocab_sizes[seq.target]}) must be item ids of the sequence",
            )
            check(
                self.embedding_dim % seq.heads == 0,
                f"{where}.heads",
                f"must divide embedding_dim={self.embedding_dim}, got {seq.heads}",
            )
            start += seq.columns
        check(
            len(self.names) <= len(self.vocab_sizes) and len(set(self.names)) == len(self.names),
            join(path, "names"),
            f"expected unique names of at most {len(self.vocab_sizes)} categorical columns, got {self.names}",
        )

    def column(self, feature: int | str, path: str) -> int:
        """The column index of a categorical feature given by index or by name."""
        if isinstance(feature, str):
            check(
                feature in self.names,
                path,
                f"unknown categorical feature {feature!r}{did_you_mean(feature, self.names)}",
            )
            return self.names.index(feature)
        check(0 <= feature < len(self.vocab_sizes), path, f"index {feature} is not a categorical feature")
        return feature


@dataclass
class BlockConfig(Config):
    """How experts are shared between tasks (the block's type, see the module docstring).

    Args:
        type: one of :data:`BLOCKS`.
        num_experts: shared experts (all blocks but ``single_task`` and ``shared_bottom``).
        task_experts: experts owned by each task (``cgc``, ``ple``, ``adatt``, ``home``, ``stem``).
        levels: extraction levels stacked by ``ple``, ``adatt`` and ``stem`` (``home`` has two).
        shared_hidden: widths of a shared hidden layer under the experts (YouTube's placement); empty = none.
        task_groups: ``home``: the task groups (lists of task names; every task in one); empty = one group.
        group_experts: ``home``: experts of each task group, at each of its two levels.
        residual: each gate's own experts added beside its mixture: ``native`` (AdaTT's native-expert
            weights), ``self_gate`` (HoME's), ``none``; ``auto`` = native for ``adatt``, self_gate for
            ``home``, none otherwise. For blocks whose gates own experts (``cgc``, ``ple``, ``adatt``,
            ``home``, ``stem``).
    """

    shorthand: ClassVar[str] = "type"
    type: BlockType = "mmoe"
    num_experts: int = 8
    task_experts: int = 1
    levels: int = 2
    shared_hidden: list[int] = field(default_factory=list)
    task_groups: list[list[str]] = field(default_factory=list)
    group_experts: int = 1
    residual: Literal["auto", "none", "native", "self_gate"] = "auto"

    def check(self, path: str) -> None:
        if self.type in ("omoe", "mmoe"):
            check(self.num_experts >= 1, join(path, "num_experts"), f"must be >= 1, got {self.num_experts}")
        if self.type in OWN_EXPERT_BLOCKS:
            check(self.levels >= 1, join(path, "levels"), f"must be >= 1, got {self.levels}")
            check(self.num_experts >= 0, join(path, "num_experts"), f"must be >= 0, got {self.num_experts}")
            check(self.task_experts >= 1, join(path, "task_experts"), f"must be >= 1, got {self.task_experts}")
        if self.type == "home":
            check(self.group_experts >= 1, join(path, "group_experts"), f"must be >= 1, got {self.group_experts}")
        check(
            self.residual in ("auto", "none") or self.type in OWN_EXPERT_BLOCKS,
            join(path, "residual"),
            f"block {self.type!r} has no experts of a gate's own; use one of {OWN_EXPERT_BLOCKS} or remove it",
        )
        check(not self.task_groups or self.type == "home", join(path, "task_groups"), "only for block type home")
        _widths(self.shared_hidden, join(path, "shared_hidden"))

    @property
    def residual_kind(self) -> str:
        """The residual after ``auto``: ``native``, ``self_gate`` or ``none``."""
        if self.residual != "auto":
            return self.residual
        return {"adatt": "native", "home": "self_gate"}.get(self.type, "none")

    @property
    def num_levels(self) -> int:
        return {"ple": self.levels, "adatt": self.levels, "stem": self.levels, "home": 2}.get(self.type, 1)


@dataclass
class ExpertConfig(Config):
    """An expert type and its options. ``type`` selects a registered expert module (``mlp``, ``dcn``, or one
    registered with :data:`EXPERTS`); a registered type may take more options (its own config class).

    Args:
        type: registered expert type.
        hidden: layer widths of each expert (its output width is the last).
        activation: activation between layers (also used by the shared hidden layer).
        dropout: dropout after each hidden layer.
    """

    registry: ClassVar[Registry] = EXPERTS
    shorthand: ClassVar[str] = "type"
    type: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [16])
    activation: Activation = "relu"
    dropout: float = 0.0

    def check(self, path: str) -> None:
        check(len(self.hidden) >= 1, join(path, "hidden"), "an expert needs at least one layer")
        _widths(self.hidden, join(path, "hidden"))
        check(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")

    def check_in(self, model: ModelConfig, path: str) -> None:
        """Rules that need the whole model (override in a registered type's config)."""


@dataclass
class GateConfig(Config):
    """A gate type and its options. ``type`` selects a registered gate module (``softmax``, ``topk``, or one
    registered with :data:`GATES`).

    Args:
        type: registered gate type.
        temperature: softmax temperature (weights = softmax(logits / temperature)).
        dropout: in training, drop each expert's weight with this probability and renormalise
            (YouTube, Zhao et al. 2019, use 0.1 against gate polarisation).
        hidden: hidden units of the gate network; 0 = one linear projection (the paper's gate).
    """

    registry: ClassVar[Registry] = GATES
    shorthand: ClassVar[str] = "type"
    moved: ClassVar[dict[str, str]] = {"top_k": "k (with type: topk)"}
    type: str = "softmax"
    temperature: float = 1.0
    dropout: float = 0.0
    hidden: int = 0

    def check(self, path: str) -> None:
        check(self.temperature > 0, join(path, "temperature"), f"must be > 0, got {self.temperature}")
        check(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")
        check(self.hidden >= 0, join(path, "hidden"), f"must be >= 0, got {self.hidden}")

    def check_in(self, model: ModelConfig, path: str) -> None:
        """Rules that need the whole model (override in a registered type's config)."""


@dataclass
class TowerConfig(Config):
    """Each task's tower: ``hidden`` layers, then a linear layer to one logit."""

    hidden: list[int] = field(default_factory=lambda: [8])
    activation: Activation = "relu"
    dropout: float = 0.0

    def check(self, path: str) -> None:
        _widths(self.hidden, join(path, "hidden"))
        check(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")


@dataclass
class MixerConfig(Config):
    """A transformer feature mixer over the feature tokens (Pinterest Closeup). ``layers = 0``: none.

    Args:
        groups: Closeup's summarization layer: lists of mixer token indices (the dense-features token is 0 when
            there are dense features, then the embedding tokens in order), each summarized into one token before
            the mixer; empty: the mixer reads every token; ``auto``: ``num_groups`` groups learned by clustering
            the tokens by the similarity of their embeddings after a warm-up (:mod:`mtrank.train.grouping`),
            then fixed: the trained model's config holds the lists.
        num_groups: with ``groups: auto``, how many groups to learn (>= 2).
        group_warmup_epochs: with ``groups: auto``, epochs of the warm-up model (a mixer over every token)
            whose embeddings are clustered.
        summary: how a group becomes one token: ``attention`` (pooling with a learned query) or ``mlp``.
        wiring: ``input``: the mixer's output is concatenated to the block input (experts and gates read it);
            ``experts``: Closeup's published wiring, concatenated to the experts' (mixed) output the towers read.
    """

    layers: int = 0
    heads: int = 2
    groups: list[list[int]] | str = field(default_factory=list)
    num_groups: int = 0
    group_warmup_epochs: int = 1
    summary: str = "attention"
    wiring: str = "input"

    def check(self, path: str) -> None:
        check(self.layers >= 0, join(path, "layers"), f"must be >= 0, got {self.layers}")
        check(
            self.summary in ("attention", "mlp"),
            join(path, "summary"),
            f"must be attention or mlp, got {self.summary!r}",
        )
        check(
            self.wiring in ("input", "experts"), join(path, "wiring"), f"must be input or experts, got {self.wiring!r}"
        )
        if isinstance(self.groups, str):
            check(
                self.groups == "auto",
                join(path, "groups"),
                f"write lists of token indices or auto, got {self.groups!r}",
            )
            check(
                self.num_groups >= 2,
                join(path, "num_groups"),
                f"groups: auto needs num_groups >= 2, got {self.num_groups}",
            )
            check(self.group_warmup_epochs >= 1, join(path, "group_warmup_epochs"), "must be >= 1")
            return
        check(
            self.num_groups == 0,
            join(path, "num_groups"),
            "only with groups: auto (the configured groups set the count)",
        )
        flat = [i for group in self.groups for i in group]
        check(all(len(g) > 0 for g in self.groups), join(path, "groups"), "every group needs at least one token index")
        check(len(flat) == len(set(flat)), join(path, "groups"), f"a token index is in two groups: {self.groups}")


@dataclass
class BiasConfig(Config):
    """YouTube's shallow tower for selection (position) bias, added to the logits in training only.

    Args:
        features: indices (into ``inputs.vocab_sizes``) of categorical features read only by this tower
            (e.g. position, device); the main model does not see them.
        hidden: hidden widths of the tower.
        dropout: in training, drop a row's bias logit with this probability.
        tasks: tasks whose logits get the bias logit (default: every binary task).
    """

    features: list[int] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.1
    tasks: list[str] = field(default_factory=list)

    def check(self, path: str) -> None:
        check(len(set(self.features)) == len(self.features), join(path, "features"), "duplicate index")
        _widths(self.hidden, join(path, "hidden"))
        check(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")


@dataclass
class PEPNetConfig(Config):
    """PEPNet (Chang et al., KDD 2023): gates conditioned on chosen categorical features, by name (or index).

    Args:
        epnet: features of EPNet's embedding gate (e.g. scenario / domain ids); empty = no EPNet.
        ppnet: features of PPNet's tower gates (e.g. user, item, author ids); empty = no PPNet.
        hidden: hidden units of each gate network (Gate NU).
        scale: gamma of ``gamma * sigmoid``, the gates' range ``(0, gamma)`` (the paper's 2).
    """

    epnet: list[str | int] = field(default_factory=list)
    ppnet: list[str | int] = field(default_factory=list)
    hidden: int = 64
    scale: float = 2.0

    @property
    def enabled(self) -> bool:
        return bool(self.epnet or self.ppnet)

    def check(self, path: str) -> None:
        check(self.hidden >= 1, join(path, "hidden"), f"must be >= 1, got {self.hidden}")
        check(self.scale > 0, join(path, "scale"), f"must be > 0, got {self.scale}")


@dataclass
class FunnelConfig(Config):
    """How the tasks with ``depends_on`` (a click -> conversion funnel) are trained.

    ``none`` trains a dependent task on the rows where its parent's label is 1 only (the naive CVR model, with
    its sample-selection bias). The others train it over the whole impression space, its score staying the
    conditional probability (pCVR) and ``pCTCVR = pCTR x pCVR`` (:func:`mtrank.train.losses.funnel_loss`):

    * ``esmm`` (Ma et al., SIGIR 2018): ``L = L_CTR + w L_CTCVR``, no direct CVR loss.
    * ``escm2`` (Wang et al., SIGIR 2022): ESMM plus ``counterfactual_weight`` x the counterfactual CVR risk,
      ``counterfactual: ips`` (inverse propensity) or ``dr`` (doubly robust, with an imputation tower).
    * ``aitm`` (Xi et al., KDD 2021): the dependent tower reads its parent's tower through an attention transfer
      and predicts the entire-space probability; ``calibrator_weight`` x ``max(p_child - p_parent, 0)``.

    Args:
        type: ``none``, ``esmm``, ``escm2`` or ``aitm``.
        counterfactual: ESCM2's risk, ``ips`` or ``dr``.
        counterfactual_weight: ESCM2's lambda_c (PaddleRec's ``counterfactual_w``).
        ips_clip: the largest inverse propensity ``1 / pCTR`` (PaddleRec's 15); 0 = no clip.
        calibrator_weight: AITM's alpha (0.6 in the paper and the authors' code).
    """

    type: Literal["none", "esmm", "escm2", "aitm"] = "none"
    counterfactual: Literal["ips", "dr"] = "ips"
    counterfactual_weight: float = 0.1
    ips_clip: float = 15.0
    calibrator_weight: float = 0.6

    def check(self, path: str) -> None:
        for name in ("counterfactual_weight", "ips_clip", "calibrator_weight"):
            value = getattr(self, name)
            check(0 <= value < math.inf, join(path, name), f"must be >= 0 and finite, got {value}")
        check(
            self.ips_clip == 0 or self.ips_clip >= 1,
            join(path, "ips_clip"),
            f"an inverse propensity is >= 1: give a clip >= 1 or 0 (none), got {self.ips_clip}",
        )


@dataclass
class ModelConfig(Config):
    """Architecture of a multi-task ranker (sections: see the module docstring)."""

    moved: ClassVar[dict[str, str]] = {old: new for old, new in zip(FLAT_FIELDS, NESTED_FIELDS)}
    section: ClassVar[str] = "model"
    inputs: InputsConfig = field(default_factory=InputsConfig)
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig("task1"), TaskConfig("task2")])
    block: BlockConfig = field(default_factory=BlockConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    towers: TowerConfig = field(default_factory=TowerConfig)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    pepnet: PEPNetConfig = field(default_factory=PEPNetConfig)
    funnel: FunnelConfig = field(default_factory=FunnelConfig)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def main_features(self) -> list[int]:
        """Indices of the categorical columns the main model reads (all but the bias features)."""
        bias = set(self.bias.features)
        columns = len(self.inputs.vocab_sizes) - self.inputs.sequence_columns  # sequences: their own encoders
        return [i for i in range(columns) if i not in bias]

    @property
    def num_tokens(self) -> int:
        """Embedded features the main model reads: embedded numeric columns, single categoricals (not bias), one
        per bag and one per sequence."""
        bags = self.inputs.bag_lengths
        return len(self.inputs.numeric) + len(self.main_features) - sum(bags) + len(bags) + len(self.inputs.sequences)

    @property
    def input_dim(self) -> int:
        plain = self.inputs.num_dense - len(self.inputs.numeric)  # dense columns that enter as they are
        return plain + self.num_tokens * self.inputs.embedding_dim

    def check(self, path: str) -> None:
        tasks = join(path, "tasks")
        check(len(self.tasks) >= 1, tasks, "at least one task is required")
        names = self.task_names
        check(len(set(names)) == len(names), tasks, f"task names must be unique, got {names}")
        check(self.input_dim > 0, join(path, "inputs"), "the model has no inputs: give dense or categorical features")
        inputs = self.inputs
        if self.mixer.layers:
            check(len(self.main_features) > 0, join(path, "mixer.layers"), "the mixer needs categorical features")
            check(
                self.mixer.heads >= 1 and inputs.embedding_dim % self.mixer.heads == 0,
                join(path, "mixer.heads"),
                f"must divide inputs.embedding_dim={inputs.embedding_dim}, got {self.mixer.heads}",
            )
            check(
                self.mixer.wiring == "input" or self.funnel.type == "none",
                join(path, "mixer.wiring"),
                f"experts wiring widens the towers' input; not with funnel.type={self.funnel.type!r}",
            )
        first_bag_column = inputs.first_bag_column
        for i, index in enumerate(self.bias.features):
            where = f"{join(path, 'bias.features')}[{i}]"
            check(
                0 <= index < len(inputs.vocab_sizes),
                where,
                f"index {index} is not a categorical feature (there are {len(inputs.vocab_sizes)})",
            )
            check(index < first_bag_column, where, f"index {index} is a bag column; the bias tower reads single ones")
        for i, name in enumerate(self.bias.tasks):
            check(name in names, f"{join(path, 'bias.tasks')}[{i}]", f"unknown task {name!r}; tasks are {names}")
        self._check_zoo(path)
        self._check_funnel(path)
        self.experts.check_in(self, join(path, "experts"))
        self.gate.check_in(self, join(path, "gate"))

    def _check_zoo(self, path: str) -> None:
        """Rules of the blocks and sections that need the whole model: HoME's groups, STEM, PEPNet."""
        block, names = self.block, self.task_names
        groups_path = join(path, "block.task_groups")
        grouped = [name for group in block.task_groups for name in group]
        for name in grouped:
            check(name in names, groups_path, f"unknown task {name!r}; tasks are {names}")
        if block.task_groups:
            check(
                sorted(grouped) == sorted(names),
                groups_path,
                f"every task must be in exactly one group; got {block.task_groups} for tasks {names}",
            )
        if block.type == "stem":
            check(bool(self.main_features), join(path, "block.type"), "stem needs categorical features to embed")
            check(
                not block.shared_hidden, join(path, "block.shared_hidden"), "not with block stem (per-task embeddings)"
            )
            check(self.mixer.layers == 0, join(path, "mixer.layers"), "not with block stem (per-task embeddings)")
            check(
                not self.inputs.sequences, join(path, "inputs.sequences"), "not with block stem (per-task embeddings)"
            )
            check(not self.pepnet.epnet, join(path, "pepnet.epnet"), "not with block stem (per-task embeddings)")
        for section in ("epnet", "ppnet"):
            where = join(path, f"pepnet.{section}")
            for i, feature in enumerate(getattr(self.pepnet, section)):
                self.pepnet_column(feature, f"{where}[{i}]")

    def _check_funnel(self, path: str) -> None:
        """Task dependencies: each names an earlier binary task; a funnel type needs one; AITM needs towers."""
        names, funnel = self.task_names, self.funnel
        for i, task in enumerate(self.tasks):
            if not task.depends_on:
                continue
            where = f"{join(path, 'tasks')}[{i}].depends_on"
            check(
                task.depends_on in names[:i],
                where,
                f"{task.depends_on!r} is not a task declared before {task.name!r}; tasks are {names}"
                f"{did_you_mean(task.depends_on, names)}",
            )
            parent = self.tasks[names.index(task.depends_on)]
            check(
                task.type == "binary" and parent.type == "binary",
                where,
                f"a funnel links binary tasks; {task.name!r} is {task.type} and {parent.name!r} is {parent.type}",
            )
        if funnel.type == "none":
            return
        where = join(path, "funnel.type")
        check(bool(self.dependents), where, f"{funnel.type} needs a task with depends_on (e.g. cvr depends_on ctr)")
        if funnel.type == "aitm":
            check(bool(self.towers.hidden), join(path, "towers.hidden"), "aitm transfers a tower's last hidden layer")
            check(not self.pepnet.ppnet, join(path, "pepnet.ppnet"), "not with funnel aitm (its output layer)")

    @property
    def parents(self) -> list[int]:
        """The index of each task's ``depends_on`` task, -1 for none."""
        names = self.task_names
        return [names.index(t.depends_on) if t.depends_on in names else -1 for t in self.tasks]

    @property
    def dependents(self) -> list[int]:
        """The tasks with a parent, in order."""
        return [k for k, parent in enumerate(self.parents) if parent >= 0]

    @property
    def funnel_columns(self) -> int:
        """Columns a training forward adds after the K task logits: ESCM2-DR's imputed errors, AITM's
        entire-space logits, one per dependent task (0 otherwise)."""
        funnel = self.funnel
        adds = funnel.type == "aitm" or (funnel.type == "escm2" and funnel.counterfactual == "dr")
        return len(self.dependents) if adds else 0

    def pepnet_column(self, feature: int | str, path: str) -> int:
        """The column of a PEPNet feature: a single categorical column that the main model reads."""
        column = self.inputs.column(feature, path)
        first_bag_column = self.inputs.first_bag_column
        check(column < first_bag_column, path, f"{feature!r} is a bag column; PEPNet gates read single ones")
        check(column not in self.bias.features, path, f"{feature!r} is a bias feature, which the main model never sees")
        return column

    def task_group_index(self) -> list[int]:
        """HoME: the group of each task (all 0 without ``block.task_groups``)."""
        index = {name: g for g, group in enumerate(self.block.task_groups) for name in group}
        return [index.get(name, 0) for name in self.task_names]

    def experts_per_gate(self) -> int:
        """How many experts one task's gate chooses among at the last level."""
        block = self.block
        if block.type in ("omoe", "mmoe"):
            return block.num_experts
        if block.type in ("cgc", "ple"):
            return block.num_experts + block.task_experts
        if block.type in ("adatt", "stem"):
            return block.num_experts + block.task_experts * self.num_tasks
        if block.type == "home":
            return block.num_experts + block.task_experts + block.group_experts
        return 1


def nest_flat_model(flat: dict) -> dict:
    """mtrank 0.1's flat model config (model directories of format 1) -> the nested sections."""
    flat = dict(flat)
    gate = dict(flat.pop("gate", {}) or {})
    top_k = gate.pop("top_k", 0)
    noisy, balance = gate.pop("noisy", True), gate.pop("load_balance_weight", 0.01)
    if top_k:
        gate.update(type="topk", k=top_k, noisy=noisy, load_balance_weight=balance)
    activation, dropout = flat.get("activation", "relu"), flat.get("dropout", 0.0)
    experts = {"type": flat.get("expert_type", "mlp"), "hidden": flat.get("expert_hidden", [16])}
    experts.update(activation=activation, dropout=dropout)
    if experts["type"] == "dcn":
        experts.update(cross_layers=flat.get("cross_layers", 2), cross_rank=flat.get("cross_rank", 0))
    bags = [{"length": n, "pooling": p} for n, p in zip(flat.get("bag_lengths", []), flat.get("bag_pooling", []))]
    nested = {
        "inputs": {
            "num_dense": flat.get("num_dense", 0),
            "vocab_sizes": flat.get("vocab_sizes", []),
            "embedding_dim": flat.get("embedding_dim", 16),
            "bags": bags,
        },
        "block": {
            "type": flat.get("block", "mmoe"),
            "num_experts": flat.get("num_experts", 8),
            "task_experts": flat.get("task_experts", 1),
            "levels": flat.get("levels", 2),
            "shared_hidden": flat.get("shared_hidden", []),
        },
        "experts": experts,
        "gate": gate,
        "towers": {"hidden": flat.get("tower_hidden", [8]), "activation": activation, "dropout": dropout},
        "mixer": {"layers": flat.get("mixer_layers", 0), "heads": flat.get("mixer_heads", 2)},
        "bias": {
            "features": flat.get("bias_features", []),
            "hidden": flat.get("bias_hidden", []),
            "dropout": flat.get("bias_dropout", 0.1),
            "tasks": flat.get("bias_tasks", []),
        },
    }
    if "tasks" in flat:
        nested["tasks"] = flat["tasks"]
    return nested
