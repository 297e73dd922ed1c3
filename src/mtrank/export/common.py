"""What every export format shares: the module exported, example inputs, and the check against eager PyTorch.

Every format exports :class:`~mtrank.model.ScoringModule` of a model, ``(dense float32 [B, F_dense], sparse
int64 [B, F_cat]) -> scores float32 [B, K]`` (probabilities for binary tasks, values for regression), traced on
:func:`random_inputs`, and is kept only if :func:`max_difference` to eager PyTorch is within
:data:`EXPORT_TOLERANCE` on inputs of another batch size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mtrank.model import MultiTaskModel, ScoringModule

EXPORT_TOLERANCE = 1e-5


def random_inputs(model: MultiTaskModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random model inputs: ``dense [B, F_dense]`` drawn from N(0, 1) and ``sparse [B, F_cat]`` valid ids.

    Args:
        model: whose inputs (``model.num_dense``, ``model.vocab_sizes``) to draw.
        batch: B, rows.
        seed: the same seed gives the same inputs.

    Example:
        >>> from mtrank.config import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5, 7]}))
        >>> dense, sparse = random_inputs(model, 4)
        >>> dense.shape, sparse.shape, bool((sparse < torch.tensor([5, 7])).all())
        (torch.Size([4, 3]), torch.Size([4, 2]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, model.num_dense, generator=gen)
    if model.vocab_sizes:
        vocab = torch.tensor(model.vocab_sizes, dtype=torch.float64)
        sparse = (torch.rand(batch, len(vocab), generator=gen, dtype=torch.float64) * vocab).long()  # (B, F_cat)
    else:
        sparse = torch.zeros(batch, 0, dtype=torch.long)
    return dense, sparse


def scoring_module(model: MultiTaskModel) -> ScoringModule:
    """``model`` in evaluation mode wrapped as ``(dense [B, F_dense], sparse [B, F_cat]) -> scores [B, K]``."""
    return ScoringModule(model.eval()).eval()


def max_difference(
    model: MultiTaskModel,
    scorer: Callable[[torch.Tensor, torch.Tensor], np.ndarray | torch.Tensor],
    batch: int = 64,
    seed: int = 1,
) -> float:
    """``max |scorer(x) - scores of eager model(x)| / max(1, |scores|)`` over random inputs ``x`` of ``batch``
    rows (by default a batch size other than the one exports are traced with): the absolute difference for
    probabilities and small values, the relative one for regression values on their labels' own scale (a
    ``label_transform`` maps outputs to thousands, where float32 itself rounds at 1e-4).

    Args:
        model: the float32 model.
        scorer: ``(dense [B, F_dense], sparse [B, F_cat]) -> scores [B, K]``, e.g. a loaded export.
        batch / seed: the random inputs.

    Example:
        >>> from mtrank.config import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3}))
        >>> max_difference(model, scoring_module(model))
        0.0
    """
    dense, sparse = random_inputs(model, batch, seed)
    with torch.inference_mode():
        expected = scoring_module(model)(dense, sparse).numpy()
        got = scorer(dense, sparse)
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    return float((np.abs(got - expected) / np.maximum(np.abs(expected), 1.0)).max())
