"""Task dependencies (a click -> conversion funnel) on top of any block's towers: ESMM, ESCM2, AITM.

A task with ``depends_on`` (``cvr`` after ``ctr``) has a label only where its parent's is 1; its score is the
conditional probability (pCVR) and the product along the chain is the entire-space one, ``pCTCVR = pCTR x
pCVR``. What each model adds to the towers is here; what it adds to the loss is
:func:`mtrank.train.losses.funnel_loss`.

* ESMM / ESCM2-IPS / the naive model: nothing; each tower's logit is its task's (conditional) logit.
* ESCM2-DR: an imputation tower per dependent task, reading that task's tower input, predicting the CVR
  error on every impression (PaddleRec's third MMoE gate and tower).
* AITM (Xi et al., KDD 2021): the dependent tower's last hidden layer ``q_t`` attends over itself and the
  transferred parent ``p_{t-1} = relu(W q_{t-1} + b)``, and predicts the entire-space probability
  ``y_t = sigmoid(w . z_t + c)``; the conditional is ``min(y_t / y_{t-1}, 1 - 1e-6)``.

In training the forward appends one column per dependent task after the K task logits (the imputation
logits, or AITM's entire-space logits), which the loss reads; evaluation, export and serving see K columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.nn.stacked import StackedLinear, StackedMLP

MAX_CONDITIONAL = 1.0 - 1e-6  # AITM's y_t / y_{t-1} is capped below 1 so that its logit is finite


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def conditional_logit(child_logit: torch.Tensor, parent_logit: torch.Tensor) -> torch.Tensor:
    """``logit(min(sigmoid(child) / sigmoid(parent), MAX_CONDITIONAL))``: a conditional probability's logit from
    two entire-space logits (AITM's pCVR from pCTCVR and pCTR)."""
    log_q = (F.logsigmoid(child_logit) - F.logsigmoid(parent_logit)).clamp_max(-1.000000500029089e-06)  # log(1-1e-6)
    return log_q - torch.log(1 - torch.exp(log_q))  # 1 - q >= 1e-6; expm1 has no ONNX export


class AttentionTransfer(nn.Module):
    """AITM's adaptive information transfer for J dependent tasks at once.

    ``p = relu(q_parent W_p + b_p)``; over ``u in {q_t, p}``: ``a_u = softmax_u(<u W_Q, u W_K> / sqrt(H))``,
    ``z_t = sum_u a_u (u W_V)`` (the authors' ``_attention``: bias-free Q, K, V, ``N(0, 0.01)`` init).

    Shapes: ``q_child, q_parent [J, B, H]`` -> ``z [J, B, H]``.

    Example:
        >>> ait = AttentionTransfer(dependents=1, width=4)
        >>> ait(torch.randn(1, 3, 4), torch.randn(1, 3, 4)).shape
        torch.Size([1, 3, 4])
    """

    def __init__(self, dependents: int, width: int) -> None:
        super().__init__()
        self.transfer = StackedLinear(dependents, width, width)
        self.qkv = nn.Parameter(torch.randn(3, dependents, width, width) * 0.01)  # W_Q, W_K, W_V per task
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, q_child: torch.Tensor, q_parent: torch.Tensor) -> torch.Tensor:
        info = torch.relu(self.transfer(q_parent))  # (J, B, H): p_{t-1}
        inputs = torch.stack([q_child, info], 2)  # (J, B, 2, H)
        w = self.qkv.to(inputs.dtype)
        query = torch.einsum("jblh,jhk->jblk", inputs, w[0])
        key = torch.einsum("jblh,jhk->jblk", inputs, w[1])
        value = torch.einsum("jblh,jhk->jblk", inputs, w[2])
        attention = torch.softmax((query * key).sum(-1).float() * self.scale, -1).to(value.dtype)  # (J, B, 2)
        return (attention.unsqueeze(-1) * value).sum(2)  # (J, B, H)


class TaskFunnel(nn.Module):
    """The towers' output -> task logits, for blocks whose tasks depend on others (see the module docstring).

    Args:
        parents: each task's parent index, -1 for none (parents come first).
        kind: ``none``, ``esmm``, ``escm2`` or ``aitm``.
        doubly_robust: ESCM2-DR (adds the imputation towers).
        mixture_width: D, the width of a task's tower input (ESCM2-DR's imputation towers read it).
        tower_hidden, activation_name: the towers' hidden widths and activation (the imputation towers copy
            them; AITM's towers end at the last hidden layer, H = ``tower_hidden[-1]``).

    Shapes: ``mixed [K, B, D]`` (each task's tower input), ``tower_out [K, B, 1]`` (AITM: ``[K, B, H]``) ->
    ``task_logits [B, K]``, and ``[B, K + J]`` in training when ESCM2-DR or AITM.
    """

    def __init__(
        self,
        parents: list[int],
        kind: str,
        doubly_robust: bool,
        mixture_width: int,
        tower_hidden: list[int],
        activation_name: str = "relu",
    ) -> None:
        super().__init__()
        self.num_tasks = len(parents)
        self.dependents = [k for k, parent in enumerate(parents) if parent >= 0]
        self.dependent_parents = [parents[k] for k in self.dependents]
        self.aitm = kind == "aitm"
        self.adds_columns = self.aitm or (kind == "escm2" and doubly_robust)
        self.register_buffer("child_index", torch.tensor(self.dependents, dtype=torch.long))
        self.register_buffer("parent_index", torch.tensor(self.dependent_parents, dtype=torch.long))
        dependents = len(self.dependents)
        self.transfer: AttentionTransfer | None = None
        self.output: StackedLinear | None = None
        self.imputation: StackedMLP | None = None
        if self.aitm:
            width = tower_hidden[-1]
            self.transfer = AttentionTransfer(dependents, width)
            self.output = StackedLinear(self.num_tasks, width, 1)
        elif self.adds_columns:
            self.imputation = StackedMLP(
                dependents, mixture_width, [*tower_hidden, 1], activation_name, final_activation=False
            )

    def forward(self, mixed: torch.Tensor, tower_out: torch.Tensor) -> torch.Tensor:
        transfer = self.transfer
        output = self.output
        imputation = self.imputation
        if transfer is not None and output is not None:
            q_child = tower_out.index_select(0, self.child_index)  # (J, B, H)
            z = transfer(q_child, tower_out.index_select(0, self.parent_index))  # (J, B, H)
            # under autocast the transfer's matmuls give bf16 while the towers' output may be fp32 (CUDA)
            z_all = tower_out.index_copy(0, self.child_index, z.to(tower_out.dtype))  # (K, B, H): roots keep q
            joint = output(z_all).squeeze(-1).transpose(0, 1).float()  # (B, K) entire-space logits (the ratio: fp32)
            logits = joint.index_copy(
                1,
                self.child_index,
                conditional_logit(joint.index_select(1, self.child_index), joint.index_select(1, self.parent_index)),
            )  # (B, K): dependents' conditional logits
            if self.training:
                return torch.cat([logits, joint.index_select(1, self.child_index)], 1)  # (B, K + J)
            return logits
        logits = tower_out.squeeze(-1).transpose(0, 1)  # (B, K)
        if imputation is not None and self.training:
            imputed = imputation(mixed.index_select(0, self.child_index)).squeeze(-1).transpose(0, 1)  # (B, J)
            return torch.cat([logits, imputed], 1)
        return logits
