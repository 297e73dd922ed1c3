"""Residuals on each gate's own experts, added beside its gated mixture (AdaTT, HoME).

A level computes ``out_g = sum_e (g_g(x)_e + r_g(x)_e) f_e`` (:class:`~mtrank.nn.block.ExtractionLevel`);
``r_g`` is zero outside gate g's own experts (``LevelLayout.own``: the task's experts for a task gate, the
group's for a HoME group gate, the shared ones for a shared gate).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.nn.gates import softmax
from mtrank.nn.stacked import StackedLinear


class NativeExpertWeights(nn.Module):
    """AdaTT's native-expert residual (Li et al., KDD 2023, AdaTT-sp): ``r_g = v_g`` on gate g's own experts.

    Following Meta's reference (``AdaTTWSharedExps``, ``self_exp_res_connect``): when every module (task or
    shared) owns exactly one expert, ``v_g = 1`` (the expert's output is added as is); otherwise each module
    learns a linear combination of its own experts, ``v_g`` initialised uniform in ``+-sqrt(1 / n_g)``.

    Shapes: ``gate input`` (unused) -> ``[1, G, E]`` float32.

    Example:
        >>> own = torch.tensor([[True, False, False], [False, True, False]])
        >>> NativeExpertWeights(own)(torch.zeros(4, 8)).tolist()
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]
    """

    def __init__(self, own: torch.Tensor, learned: bool | None = None) -> None:
        super().__init__()
        counts = own.sum(1)  # (G,)
        learned = bool((counts[counts > 0] != 1).any()) if learned is None else learned
        self.register_buffer("own", own.float())
        self.weights = None
        if learned:
            scale = torch.sqrt(1.0 / counts.clamp_min(1).float()).unsqueeze(1)  # (G, 1)
            self.weights = nn.Parameter((torch.rand(own.shape) * 2 - 1) * scale * own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.weights
        if weights is None:
            return self.own.unsqueeze(0)  # (1, G, E)
        return (weights * self.own).float().unsqueeze(0)  # (1, G, E)


class SelfGates(nn.Module):
    """HoME's self-gate (Wang et al., Kuaishou 2024, Sec. 4.3): each gate's own experts, gated again from the
    gate's input and added beside the mixture, ``r_g(x) = sigma(w_g x + b_g)`` for a single own expert, else
    ``softmax_{own(g)}(W_g x + b_g)``; a residual path that keeps gradients reaching the specific experts of
    a deep hierarchy.

    Shapes: ``x [B, in]`` or ``[G, B, in]`` -> ``[B, G, E]`` float32 (zero outside each gate's own experts).

    Example:
        >>> own = torch.tensor([[True, False, False], [False, True, True]])
        >>> r = SelfGates(8, own)(torch.randn(4, 8))
        >>> r.shape, bool(torch.allclose(r[:, 1].sum(-1), torch.ones(4))), bool((r[:, 0, 0] < 1).all())
        (torch.Size([4, 2, 3]), True, True)
    """

    def __init__(self, in_features: int, own: torch.Tensor) -> None:
        super().__init__()
        counts = own.sum(1)
        self.register_buffer("own", own.clone())
        self.register_buffer("single", (counts == 1).unsqueeze(1).expand_as(own).clone())  # (G, E)
        # the lowest float32, not -inf (softmax gives it weight 0 just the same): a saved model directory refuses
        # non-finite tensors
        lowest = torch.finfo(torch.float32).min
        self.register_buffer("fill", torch.where(counts > 0, lowest, 0.0).unsqueeze(1))  # (G, 1)
        self.proj = StackedLinear(own.shape[0], in_features, own.shape[1])
        nn.init.normal_(self.proj.weight, std=0.01)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x).float().transpose(0, 1)  # (G, B, E) -> (B, G, E)
        masked = torch.where(self.own, logits, self.fill)  # lowest outside own experts (0 if a gate has none)
        weights = torch.where(self.single, torch.sigmoid(logits), softmax(masked))
        return weights * self.own
