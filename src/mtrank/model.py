"""MultiTaskModel: composes the nn parts from a :class:`~mtrank.config.ModelConfig`, and owns its facts.

Upper layers (training, export, serving) ask the model what they need (its tasks, inputs, dtype, expert banks,
random sources) instead of reading its modules.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.config import EXPERTS, GATES, ConfigError, ModelConfig, TaskConfig
from mtrank.nn import ExtractionLevel, FeatureEmbedding, MultiTaskBlock, StackedMLP, block_layouts
from mtrank.nn.bias import BiasTower
from mtrank.nn.funnel import TaskFunnel
from mtrank.nn.mixer import FeatureMixer
from mtrank.nn.pepnet import EPNet, PPNet
from mtrank.nn.residual import NativeExpertWeights, SelfGates
from mtrank.nn.sequence import sequence_encoders
from mtrank.nn.stacked import MLP

TABLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # inputs.table_dtype


class MultiTaskOutput(NamedTuple):
    """What a forward pass returns, so analysis and regularisers need no hooks.

    Attributes:
        task_logits: ``[B, K]`` logits (binary tasks) or predictions (regression tasks).
        gate_weights: ``[B, K, E]`` each task's weight on each expert (float32).
        aux_loss: ``[]`` auxiliary gate loss (load balancing for top-k gates; 0 otherwise).
    """

    task_logits: torch.Tensor
    gate_weights: torch.Tensor
    aux_loss: torch.Tensor


class LabelInverse(nn.Module):
    """Outputs of regression tasks learned on a transformed scale -> the labels' own scale:
    ``y = z * label_std + label_mean``, then ``sign(y) (exp(|y|) - 1)`` for the ``log1p`` transforms (each
    task's :class:`~mtrank.config.TaskConfig`; the identity for the others). ``[B, K] -> [B, K]``.

    Example:
        >>> inverse = LabelInverse([TaskConfig("y", "regression", 1.0, "log1p_standardize", 2.0, 0.5)])
        >>> round(inverse(torch.tensor([[0.0]])).item(), 4)  # exp(2) - 1
        6.3891
    """

    def __init__(self, tasks: list[TaskConfig]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([t.label_std for t in tasks], dtype=torch.float32))
        self.register_buffer("shift", torch.tensor([t.label_mean for t in tasks], dtype=torch.float32))
        self.register_buffer("log1p", torch.tensor([t.label_transform.startswith("log1p") for t in tasks]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        # exp(|y|) - 1, not expm1: ONNX has no expm1 (the difference is float32 rounding near 0)
        return torch.where(self.log1p, torch.sign(y) * (torch.exp(y.abs()) - 1), y)


class MultiTaskModel(nn.Module):
    """A multi-task ranker: input representation (-> feature mixer) -> multi-task block -> one output per task.

    Bias features (YouTube's position / device) skip the main model and feed a shallow tower whose logit is added
    to the task logits in training only; evaluation and serving scores are debiased. With ``block: stem`` every
    task (and the shared experts) reads its own embedding of the categorical features (one lookup in a table
    ``K + 1`` times as wide); with ``pepnet`` sections, EPNet gates the block input and PPNet the towers. Tasks
    with ``depends_on`` output their conditional logit (pCVR); with ``funnel: escm2`` (DR) or ``aitm`` a training
    forward appends one column per dependent task for the loss (:mod:`mtrank.nn.funnel`).

    Shapes: ``dense [B, F_dense]`` float, ``sparse [B, F_cat]`` int64 -> :class:`MultiTaskOutput`.

    Args:
        config: the architecture (validated here).
        seed: initialisation seed: the same config and seed give the same weights, whatever else drew random
            numbers before (the global generator is left as it was). None draws from torch's global generator.

    Example:
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 100}, block="mmoe"))
        >>> out = model(torch.randn(4, 100), torch.zeros(4, 0, dtype=torch.long))
        >>> out.task_logits.shape, out.gate_weights.shape
        (torch.Size([4, 2]), torch.Size([4, 2, 8]))
    """

    __jit_unused_properties__ = [
        "tasks", "task_names", "num_dense", "vocab_sizes", "dtype", "device", "label_transformed",
    ]  # fmt: skip

    def __init__(self, config: ModelConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config.validate("model")
        if seed is None:
            self._build(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                self._build(config)

    def _build(self, config: ModelConfig) -> None:
        inputs, main = config.inputs, config.main_features
        self.tables = config.num_tasks + 1 if config.block.type == "stem" else 1  # STEM: per-task + shared
        self.embedding = FeatureEmbedding(
            inputs.num_dense,
            [inputs.vocab_sizes[i] for i in main],
            inputs.embedding_dim * self.tables,
            inputs.bag_lengths,
            inputs.bag_pooling,
            inputs.numeric,
            TABLE_DTYPES[inputs.table_dtype],
        )
        self.select_main = len(main) != len(inputs.vocab_sizes)
        self.register_buffer("main_features", torch.tensor(main, dtype=torch.long))
        # user action sequences: one token each, after the embedding's tokens
        first_sequence_column = len(inputs.vocab_sizes) - inputs.sequence_columns
        self.sequences = sequence_encoders(inputs.sequences, first_sequence_column, inputs.embedding_dim)
        self.mixer = None
        self.mixer_to_towers = config.mixer.layers > 0 and config.mixer.wiring == "experts"
        side = 0  # width concatenated to the experts' output (the mixer's, in Closeup's wiring)
        # the plain dense columns and every token (embedded numeric columns first, sequences last) at one width
        num_tokens = self.embedding.num_tokens + len(self.sequences)
        block_in = self.embedding.num_plain + num_tokens * inputs.embedding_dim
        if config.mixer.layers:
            mixer = config.mixer
            count = num_tokens + (1 if self.embedding.num_plain else 0)
            if isinstance(mixer.groups, str):
                raise ConfigError(
                    "model.mixer.groups: 'auto' is learned by a warm-up before the model is built (mtrank train does "
                    "it; in Python: mtrank.train.grouping.resolve_mixer_groups)"
                )
            bad = [i for group in mixer.groups for i in group if not 0 <= i < count]
            if bad:
                raise ConfigError(f"model.mixer.groups: token indices {bad} out of range; the mixer has {count} tokens")
            self.mixer = FeatureMixer(
                self.embedding.num_plain,
                num_tokens,
                inputs.embedding_dim,
                mixer.layers,
                mixer.heads,
                [list(g) for g in mixer.groups],
                mixer.summary,
            )
            if self.mixer_to_towers:
                side = self.mixer.output_dim
            else:
                block_in += self.mixer.output_dim
        self.input_pad = -block_in % inputs.pad_to  # zero columns after the block input (tensor-core alignment)
        self.block = build_block(config, block_in + self.input_pad, side)
        binary = [task.type == "binary" for task in config.tasks]
        self.register_buffer("binary_mask", torch.tensor(binary, dtype=torch.bool))
        # regression outputs back to the labels' scale; only when a task transforms its labels, so other models
        # keep the weights they always had
        transformed = any(t.label_transform != "none" for t in config.tasks)
        self.label_inverse = LabelInverse(config.tasks) if transformed else None
        self.bias_tower = None
        bias = config.bias
        self.register_buffer("bias_features", torch.tensor(bias.features, dtype=torch.long))
        if bias.features:
            names = bias.tasks or [t.name for t in config.tasks if t.type == "binary"]
            task_mask = torch.tensor([t.name in names for t in config.tasks])
            self.bias_tower = BiasTower(
                [inputs.vocab_sizes[i] for i in bias.features],
                inputs.embedding_dim,
                list(bias.hidden),
                task_mask,
                bias.dropout,
            )
        self._build_pepnet(config, block_in)

    def _build_pepnet(self, config: ModelConfig, block_in: int) -> None:
        """EPNet and PPNet of ``config.pepnet`` (None without), and which embedding tokens each reads."""
        pepnet, main = config.pepnet, config.main_features
        # single columns come first among the categorical tokens, after the embedded numeric columns
        first = self.embedding.num_numeric_tokens
        tokens = {column: first + t for t, column in enumerate(main)}

        def token_index(features: list) -> torch.Tensor:
            columns = [config.pepnet_column(f, "model.pepnet") for f in features]
            return torch.tensor([tokens[c] for c in columns], dtype=torch.long)

        dim = config.inputs.embedding_dim
        self.epnet = self.ppnet = None
        if pepnet.epnet:
            self.epnet = EPNet(token_index(pepnet.epnet), dim, block_in, pepnet.hidden, pepnet.scale)
        if pepnet.ppnet:
            layer_inputs = [layer.in_features for layer in self.block.towers.layers]
            self.ppnet = PPNet(
                token_index(pepnet.ppnet), dim, block_in, layer_inputs, config.num_tasks, pepnet.hidden, pepnet.scale
            )
        self.reads_tokens = self.mixer is not None or pepnet.enabled

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> MultiTaskOutput:
        x, tower_scales, side = self.block_input(dense, sparse)
        task_logits, gate_weights, aux_loss = self.block(x, tower_scales, side)
        if self.bias_tower is not None and self.training:
            bias_logits = self.bias_tower(sparse.index_select(1, self.bias_features))  # (B, K)
            task_logits = task_logits + F.pad(bias_logits, (0, task_logits.shape[1] - bias_logits.shape[1]))
        return MultiTaskOutput(task_logits, gate_weights, aux_loss)

    def block_input(
        self, dense: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
        """The block's input ``[B, in]`` (STEM: ``[K+1, B, in]``, each task's and the shared embeddings),
        PPNet's tower scales (None without PPNet) and what the towers read beside the experts' output (the
        mixer's ``[B, S]`` in Closeup's wiring, else None). ``inputs.pad_to`` appends zero columns to ``in``."""
        x, tower_scales, side = self._block_input(dense, sparse)
        if self.input_pad:
            x = nn.functional.pad(x, (0, self.input_pad))
        return x, tower_scales, side

    def _block_input(
        self, dense: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
        main_sparse = sparse.index_select(1, self.main_features) if self.select_main else sparse
        if self.tables > 1:
            return self.task_embeddings(dense, main_sparse), None, None
        if not self.reads_tokens:
            x = self.embedding(dense, main_sparse)  # (B, in): one lookup, one concatenation
            if len(self.sequences) == 0:
                return x, None, None
            return torch.cat([x, self.sequence_tokens(sparse, x.dtype).flatten(1)], 1), None, None
        tokens = self.feature_tokens(dense, sparse, main_sparse)  # (B, T + S, D)
        plain = self.embedding.plain(dense).to(tokens.dtype)  # (B, F_plain)
        parts = [plain, tokens.flatten(1)]
        side: torch.Tensor | None = None
        mixer = self.mixer
        if mixer is not None:
            mixed = mixer(plain, tokens)  # (B, S)
            if self.mixer_to_towers:
                side = mixed
            else:
                parts.append(mixed)
        x = torch.cat(parts, 1)  # (B, in)
        epnet = self.epnet
        if epnet is not None:
            x = epnet(tokens, x)
        tower_scales: list[torch.Tensor] | None = None
        ppnet = self.ppnet
        if ppnet is not None:
            tower_scales = ppnet(tokens, x)
        return x, tower_scales, side

    def mixer_tokens(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """The tokens the mixer reads ``[B, T, D]``, before any summary (what learned grouping clusters)."""
        if self.mixer is None:
            raise ValueError("mixer_tokens: the model has no mixer (model.mixer.layers is 0)")
        main_sparse = sparse.index_select(1, self.main_features) if self.select_main else sparse
        tokens = self.feature_tokens(dense, sparse, main_sparse)  # (B, T + S, D)
        return self.mixer.tokens(self.embedding.plain(dense).to(tokens.dtype), tokens)

    def feature_tokens(self, dense: torch.Tensor, sparse: torch.Tensor, main_sparse: torch.Tensor) -> torch.Tensor:
        """Every token ``[B, T + S, D]``: the embedded numeric columns and categorical features, then each user
        action sequence's."""
        tokens = self.embedding.tokens(dense, main_sparse)  # (B, T, D)
        if len(self.sequences) > 0:
            tokens = torch.cat([tokens, self.sequence_tokens(sparse, tokens.dtype)], 1)
        return tokens

    def sequence_tokens(self, sparse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each user action sequence's token: ``sparse [B, F_cat] -> [B, S, D]``."""
        tokens: list[torch.Tensor] = []
        for encoder in self.sequences:  # a loop, not a comprehension: TorchScript unrolls it over the ModuleList
            tokens.append(encoder(sparse).to(dtype))
        return torch.stack(tokens, 1)

    def task_embeddings(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """STEM's inputs: each task's (then the shared) embeddings of every token, after the plain dense
        features, from one lookup in the ``K + 1`` times wider table (embedded numeric columns: ``K + 1`` times
        wider output layers on shared bins / frequencies): ``-> [K+1, B, F_plain + T * D]``."""
        tokens = self.embedding.tokens(dense, sparse)  # (B, T, (K+1) * D)
        batch, features = tokens.shape[0], tokens.shape[1]
        per_table = tokens.view(batch, features, self.tables, -1).permute(2, 0, 1, 3)  # (K+1, B, T, D)
        per_table = per_table.reshape(self.tables, batch, -1)  # (K+1, B, T * D)
        plain = self.embedding.plain(dense).to(tokens.dtype)  # (B, F_plain)
        dense_part = plain.unsqueeze(0).expand(self.tables, -1, -1)  # (K+1, B, F_plain)
        return torch.cat([dense_part, per_table], 2)

    @torch.no_grad()
    def expert_trace(self, dense: torch.Tensor, sparse: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every level's ``(expert_out [E, B, D], gate_weights [B, G, E])`` in evaluation mode, bottom level
        first: what the expert-health metrics read (:func:`mtrank.evaluate.gates.model_gate_report`)."""
        was_training = self.training
        self.eval()
        try:
            x, tower_scales, side = self.block_input(dense, sparse)
            return self.block.run(x, tower_scales, True, side)[3]
        finally:
            self.train(was_training)

    def scores(self, task_logits: torch.Tensor) -> torch.Tensor:
        """Logits -> scores: sigmoid for binary tasks; for regression the prediction on the labels' own scale
        (the identity unless a task has a ``label_transform``: ``y = z * label_std + label_mean``, then
        ``sign(y) expm1(|y|)`` for the log1p ones). ``[B, K] -> [B, K]``."""
        values = task_logits if self.label_inverse is None else self.label_inverse(task_logits)
        return torch.where(self.binary_mask, torch.sigmoid(task_logits), values)

    @torch.no_grad()
    def init_task_bias(self, labels: torch.Tensor) -> None:
        """Start each binary task's tower output bias at the log-odds of its label rate in ``labels [N, K]``
        (NaN: missing), so training need not learn the base rate through the towers' hidden ReLUs. A rare
        positive class (a 6% click rate: a logit of -2.7) learnt from a random bias pushes every hidden unit of a
        small tower negative in the first few dozen Adam steps, and a tower can die (study 2, seed 2).
        Regression tasks keep their bias; AITM's towers end before the transfer, so they are refused."""
        if self.config.funnel.type == "aitm":
            raise ValueError("init_task_bias: AITM's towers end at a hidden layer; there is no output bias to set")
        rate = torch.nanmean(labels.double(), 0).clamp(1e-6, 1 - 1e-6)  # (K,)
        bias = self.block.towers.layers[-1].bias  # (K, 1, 1)
        for k in torch.nonzero(self.binary_mask).flatten().tolist():
            bias[k] = torch.logit(rate[k]).to(bias.dtype)

    @property
    def label_transformed(self) -> bool:
        """Whether a regression task learns its labels on a transformed scale (``TaskConfig.label_transform``)."""
        return self.label_inverse is not None

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Scores for every task, ``[B, K]``, in evaluation mode."""
        was_training = self.training
        self.eval()
        try:
            return self.scores(self(dense, sparse).task_logits.float())
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------ facts

    @property
    def tasks(self) -> list[TaskConfig]:
        return self.config.tasks

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    @property
    def num_dense(self) -> int:
        """Width of the ``dense`` input."""
        return self.config.inputs.num_dense

    @property
    def vocab_sizes(self) -> list[int]:
        """Vocabulary of each column of the ``sparse`` input (ids in ``[0, vocab)``)."""
        return list(self.config.inputs.vocab_sizes)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes its input representation in (float32, or bf16 / fp16 after a cast);
        a dense input is cast to it. A bf16 / fp16 embedding table (``inputs.table_dtype``) is storage: not
        counted."""
        tables = {id(p) for p in self.embedding_tables()}
        computed = [p.dtype for p in self.parameters() if p.is_floating_point() and id(p) not in tables]
        return computed[0] if computed else next(p.dtype for p in self.parameters() if p.is_floating_point())

    def embedding_tables(self) -> list[nn.Parameter]:
        """The categorical embedding table's weight (``[sum(vocab_sizes), D]``; none without categorical
        features): what ``train.sparse`` trains with a row-wise optimiser."""
        table = self.embedding.table
        return [] if table is None else [table.weight]

    def sparse_gradients(self, enabled: bool = True) -> None:
        """Make the embedding table's gradient a sparse tensor of the batch's rows (for ``train.sparse``)."""
        if self.embedding.table is not None:
            self.embedding.table.sparse = enabled

    @property
    def device(self) -> torch.device:
        return self.binary_mask.device

    def expert_banks(self) -> list[tuple[nn.ModuleList, bool]]:
        """The stacked linear layers of every level's experts (what reduced-precision inference rewrites), each
        with whether its first layer reads one ``[B, in]`` input shared by every expert: the first level's
        experts do, unless their type puts something per expert before the layers (DCN's cross network, HoME's
        feature gate) or the block input has a row per task (STEM); upper levels read per-expert inputs."""
        banks = []
        for index, level in enumerate(self.block.levels):
            linear_banks = getattr(level.experts, "linear_banks", None)
            for layers, reads_input in linear_banks() if linear_banks is not None else []:
                banks.append((layers, reads_input and index == 0 and self.tables == 1))  # STEM: per-task rows
        return banks

    def level_gate_names(self) -> list[list[str]]:
        """The name of each gate (each output row) of every level, bottom first: task names, then HoME's
        ``group <c>`` gates and the ``shared`` gate of a lower level."""
        block, names = self.config.block, self.task_names
        out = []
        for index, level in enumerate(self.block.levels):
            gates = len(names) if level.shared_gate else level.gates.num_gates  # OMoE's gate serves every task
            if block.type == "home" and index == 0:
                out.append([f"group {c}" for c in range(gates - 1)] + ["shared"])
            else:
                out.append(names[:gates] + ["shared"] * (gates - len(names)))
        return out

    def shared_hidden_layer(self) -> nn.Module | None:
        """The shared hidden layer under the experts (YouTube's placement; plain ``nn.Linear`` layers), or None."""
        return self.block.shared

    def random_sources(self) -> list[str]:
        """What draws random numbers in a training step (empty when the step is deterministic): dropout layers,
        gate dropout, noisy gates, bias-tower dropout, by module name."""
        sources = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                sources.append(f"dropout ({name})")
            own = getattr(module, "random_sources", None)
            if own is not None and module is not self:
                sources += [f"{what} ({name})" for what in own()]
        return sources


def build_block(config: ModelConfig, in_features: int, side: int = 0) -> MultiTaskBlock:
    """The multi-task block of ``config``: shared hidden layer, levels of registered experts and gates (and
    each gate's residual on its own experts), towers."""
    block, experts = config.block, config.experts
    shared = MLP(in_features, block.shared_hidden, experts.activation) if block.shared_hidden else None
    width = shared.output_dim if shared is not None else in_features
    expert_type = EXPERTS.module(experts.type, "model.experts.type")
    gate_type = GATES.module(config.gate.type, "model.gate.type")
    layouts = block_layouts(
        block.type,
        config.num_tasks,
        block.num_experts,
        block.task_experts,
        block.num_levels,
        config.task_group_index(),
        block.group_experts,
    )
    residual_kind = block.residual_kind
    # AdaTT's reference adds the native experts as they are when every module owns one, else learns weights
    learned = block.task_experts != 1 or block.num_experts > 1
    levels = []
    for layout in layouts:
        expert_bank = expert_type.from_config(layout.owners.numel(), width, experts)
        gates = gate_type.from_config(width, layout.allowed, config.gate)
        residual: nn.Module | None = None
        if residual_kind == "native" and bool(layout.own.any()):
            residual = NativeExpertWeights(layout.own, learned)
        elif residual_kind == "self_gate" and bool(layout.own.any()):
            residual = SelfGates(width, layout.own)
        levels.append(ExtractionLevel(expert_bank, gates, layout, config.num_tasks, residual))
        width = expert_bank.output_dim
    towers, funnel = config.towers, config.funnel
    aitm = funnel.type == "aitm"  # AITM's towers end at their last hidden layer; its output layer follows the transfer
    tower_bank = StackedMLP(
        config.num_tasks,
        width + side,
        towers.hidden if aitm else [*towers.hidden, 1],
        towers.activation,
        towers.dropout,
        final_activation=aitm,
    )
    task_funnel = None
    if config.funnel_columns:
        task_funnel = TaskFunnel(
            config.parents, funnel.type, funnel.counterfactual == "dr", width, list(towers.hidden), towers.activation
        )
    return MultiTaskBlock(levels, tower_bank, shared, task_funnel)


class ScoringModule(nn.Module):
    """Export wrapper: ``(dense, sparse) -> scores [B, K]`` (probabilities for binary tasks)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.model.scores(self.model(dense, sparse).task_logits)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_shared_bottom(config: ModelConfig) -> ModelConfig:
    """A Shared-Bottom config whose bottom width gives the parameter count closest to ``config``'s model.

    The paper compares MMoE with 8 experts of 16 units against a Shared-Bottom of 113 units "with the same
    number of parameters"; this helper does that sizing for any config (one-layer bottom, same towers).
    """
    target = count_parameters(MultiTaskModel(config))

    def with_width(width: int) -> ModelConfig:
        return dataclasses.replace(
            config,
            block=dataclasses.replace(config.block, type="shared_bottom"),
            experts=dataclasses.replace(config.experts, hidden=[width]),
        )

    def params(width: int) -> int:
        return count_parameters(MultiTaskModel(with_width(width)))

    lo, hi = 1, 1
    while params(hi) < target:
        hi *= 2
    while lo < hi:  # smallest width with params >= target
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(params(w) - target))
    return with_width(best)
