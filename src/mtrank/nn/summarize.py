"""Summarization layer (Pinterest Closeup): each group of feature tokens summarized into one token; the groups
configured, or learned by clustering the tokens by the similarity of their embeddings (:func:`token_similarity`,
:func:`cluster_tokens`)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupSummary(nn.Module):
    """Summarizes each group of feature tokens (e.g. user, item, context) into one token, so a transformer
    mixer after it costs ``O(G^2)`` in the number of groups, not ``O(T^2)`` in the number of tokens.

    Group ``g`` holds the tokens ``x_i, i in S_g`` (``[B, D]`` each). Two summaries:

    * ``attention`` (attention pooling with one learned query ``q_g`` per group)::

        a_gi = softmax_{i in S_g}( q_g . W_k x_i / sqrt(D) ),   s_g = sum_{i in S_g} a_gi W_v x_i

    * ``mlp`` (a small MLP per group over its concatenated tokens, zero-padded to the largest group)::

        s_g = W2_g relu( W1_g [x_i for i in S_g] + b1_g ) + b2_g

    Groups are given as lists of token indices; they are padded to the largest group with a masked index, and a
    padded slot never changes a summary (its attention weight is exactly 0; its MLP input is exactly 0).

    Shapes: ``tokens [B, T, D]`` -> ``[B, G, D]``.

    The base class holds the groups; :class:`AttentionSummary` and :class:`MLPSummary` summarize.

    Example:
        >>> summary = AttentionSummary([[0, 1], [2]], dim=4)
        >>> summary(torch.randn(3, 3, 4)).shape
        torch.Size([3, 2, 4])
    """

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__()
        width = max(len(g) for g in groups)
        index = torch.tensor([g + [0] * (width - len(g)) for g in groups], dtype=torch.long)  # (G, N)
        valid = torch.tensor([[True] * len(g) + [False] * (width - len(g)) for g in groups])  # (G, N)
        self.register_buffer("index", index)
        self.register_buffer("valid", valid)
        self.num_groups, self.width, self.dim = len(groups), width, dim


class AttentionSummary(GroupSummary):
    """Attention pooling with one learned query per group (see :class:`GroupSummary`)."""

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__(groups, dim)
        self.query = nn.Parameter(torch.randn(len(groups), dim) / math.sqrt(dim))  # (G, D)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        grouped = tokens[:, self.index]  # (B, G, N, D)
        scores = torch.einsum("bgnd,gd->bgn", self.key(grouped), self.query.to(tokens.dtype)) / math.sqrt(self.dim)
        weights = torch.softmax(scores.masked_fill(~self.valid.unsqueeze(0), float("-inf")), dim=-1)  # (B, G, N)
        return torch.einsum("bgn,bgnd->bgd", weights, self.value(grouped))  # (B, G, D)


class MLPSummary(GroupSummary):
    """A small MLP per group over its concatenated (zero-padded) tokens (see :class:`GroupSummary`)."""

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__(groups, dim)
        count = len(groups)
        self.w1 = nn.Parameter(torch.randn(count, self.width * dim, dim) / math.sqrt(self.width * dim))  # (G, N*D, D)
        self.b1 = nn.Parameter(torch.zeros(count, dim))
        self.w2 = nn.Parameter(torch.randn(count, dim, dim) / math.sqrt(dim))  # (G, D, D)
        self.b2 = nn.Parameter(torch.zeros(count, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = self.valid.unsqueeze(0).unsqueeze(-1).to(tokens.dtype)  # (1, G, N, 1)
        flat = (tokens[:, self.index] * keep).reshape(tokens.shape[0], self.num_groups, -1)  # (B, G, N*D)
        dtype = tokens.dtype
        hidden = torch.relu(torch.einsum("bgi,gio->bgo", flat, self.w1.to(dtype)) + self.b1.to(dtype))
        return torch.einsum("bgi,gio->bgo", hidden, self.w2.to(dtype)) + self.b2.to(dtype)  # (B, G, D)


SUMMARIES = {"attention": AttentionSummary, "mlp": MLPSummary}


def token_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Linear CKA between every two tokens over a sample of rows, ``[B, T, D] -> [T, T]`` in ``[0, 1]``.

    Token ``t`` over the rows is ``X_t [B, D]`` (centred over the rows); then

        CKA(s, t) = ||X_s^T X_t||_F^2 / (||X_s^T X_s||_F ||X_t^T X_t||_F)

    (Kornblith et al. 2019). It is invariant to rotations and scales of either token's space, so two features
    embedded in different tables, in different directions, score high when they carry the same information about
    the row (e.g. a user id and the user's age bucket), and near 0 when they vary independently. A token
    constant over the rows carries nothing: its similarity to every other token is 0.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, rotation = torch.randn(500, 4), torch.linalg.qr(torch.randn(4, 4))[0]
        >>> sim = token_similarity(torch.stack([x, 3 * x @ rotation, torch.randn(500, 4)], 1))
        >>> (sim[0, 1] > 0.9).item(), (sim[0, 2] < 0.1).item()
        (True, True)
    """
    x = tokens.double()
    x = x - x.mean(0, keepdim=True)  # (B, T, D) centred over the rows
    cross = torch.einsum("bsd,bte->stde", x, x)  # (T, T, D, D) = X_s^T X_t
    hsic = (cross**2).sum((-2, -1))  # (T, T)
    norm = hsic.diagonal().sqrt()  # (T,)
    scale = torch.outer(norm, norm)
    return torch.where(scale > 0, hsic / scale.clamp_min(1e-300), torch.zeros_like(hsic)).float()


def cluster_tokens(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of the tokens on ``1 - similarity`` (scipy), cut into
    ``num_groups`` groups: lists of token indices, each sorted, ordered by their first token (deterministic).

    Example:
        >>> sim = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> cluster_tokens(sim, 2)
        [[0, 1], [2]]
    """
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    count = similarity.shape[0]
    if not 2 <= num_groups <= count:
        raise ValueError(
            f"model.mixer.num_groups: must be in [2, {count}] (the mixer has {count} tokens), got {num_groups}"
        )
    distance = (1.0 - similarity.double()).clamp_min(0.0).numpy()
    distance = (distance + distance.T) / 2  # symmetric, 0 on the diagonal
    distance[range(count), range(count)] = 0.0
    tree = linkage(squareform(distance, checks=False), method="average")  # monotone: cut_tree gives exactly K
    labels = cut_tree(tree, n_clusters=num_groups)[:, 0]
    groups: dict[int, list[int]] = {}
    for token, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(token)
    return sorted(groups.values(), key=lambda members: members[0])
