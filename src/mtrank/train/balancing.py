"""Task balancing at the one training step: how K task losses become one update.

The step (:mod:`mtrank.train.step`) asks its :class:`Balancer` for two things and nothing else:

* ``backward(losses)`` inside the step: differentiate the balanced objective (and, for gradient surgery, rewrite
  the shared parameters' gradients) before clipping and the optimizer step;
* ``observe(per_task, present)`` after the step, outside any CUDA graph: update the method's state from the
  step's detached losses (DWA's loss history, FAMO's logits, uncertainty's log-variances).

With ``L_k`` the masked mean loss of task k (:func:`~mtrank.train.losses.batch_losses`; a funnel task's
entire-space loss, e.g. ESMM's CTCVR loss), ``c_k`` its configured weight, ``L'_k = c_k L_k`` and ``extra`` the
gates' auxiliary loss + distillation + a funnel's regularisers (ESCM2, AITM; never reweighted), every weighting
method trains ``sum_k m_k L'_k + extra`` with multipliers ``m_k`` it keeps in :attr:`Balancer.weights` (``[K]``,
``[R, K]`` for R stacked runs; every run has its own state). Formulas and references: docs/balancing.md.

=============  ======================================================================================  =====
``fixed``      ``m_k = 1``                                                                              graph
``uncertainty``  ``m_k = a_k exp(-s_k)``, ``a = 1/2`` regression, ``1`` binary; ``s`` by Adam on the
               objective ``a_k exp(-s_k) L'_k + s_k / 2`` (Kendall et al. 2018)                          graph
``dwa``        ``m = K softmax(r / T)``, ``r_k`` = ratio of the last two period-mean losses (Liu 2019)     graph
``famo``       ``m_k = z_k / (L'_k sum_i z_i / L'_i)``, ``z = softmax(xi)``, ``xi`` by Adam on the
               change of ``log L'`` between consecutive steps (Liu et al. 2023)                          graph
``gradnorm``   ``m`` by Adam on ``sum_k |m_k |grad_W L'_k| - mean_G r_k^alpha|`` over the last shared
               layer ``W``, renormalised to sum K (Chen et al. 2018)                                     eager
``pcgrad``     shared gradient = ``sum_k`` of ``g_k`` projected off every conflicting ``g_j`` (Yu 2020)  eager
``cagrad``     shared gradient = ``K (g_0 + sqrt(phi) g_w / |g_w|) / (1 + c^2)`` (Liu et al. 2021)          eager
=============  ======================================================================================  =====

"graph": the step stays one CUDA graph (the multipliers are a device tensor the graph reads; ``observe`` runs
outside it). "eager": the method needs each task's gradient and data-dependent choices inside the step, so a
CUDA-graph request falls back to the eager step and says so (:attr:`Balancer.eager_reason`).

Per-task gradients (:func:`~mtrank.evaluate.conflict.task_gradients`) are taken on the *shared* parameters only
(:func:`~mtrank.evaluate.conflict.shared_parameter_masks`): K extra backward passes through the retained graph
(``task_gradients: loop``) or one vmapped backward (``batched``); the towers keep their ordinary gradient, and
the shared gradient of ``extra`` is kept as is. Under data-parallel training the per-task gradients and the
losses that drive the weights are averaged over ranks first, so every rank takes the same decision.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtrank.config import BALANCERS, BalancingConfig, TrainConfig
from mtrank.config.train import (
    CAGradConfig,
    DWAConfig,
    FAMOConfig,
    GradNormConfig,
    PCGradConfig,
    UncertaintyConfig,
)
from mtrank.evaluate.conflict import (
    conflict_stats,
    flat_record,
    gram_matrices,
    shared_layers,
    shared_parameter_masks,
    task_gradients,
)
from mtrank.train.distributed import rank_and_world
from mtrank.train.losses import BatchLosses, FunnelSpec, batch_losses

__all__ = [
    "Balancer",
    "make_balancer",
    "uncertainty_optimum",
    "dwa_weights",
    "gradnorm_targets",
    "famo_weights",
    "pcgrad",
    "cagrad",
]

EPS = 1e-8


# ------------------------------------------------------------------------------------------ the formulas


def uncertainty_optimum(losses: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """The log-variances ``s_k`` that minimise ``a_k exp(-s_k) L_k + s_k / 2`` for fixed losses: ``log(2 a_k L_k)``
    (``log L`` for regression, ``log 2L`` for binary tasks); at the optimum every task's multiplier is
    ``a_k exp(-s_k) = 1 / (2 L_k)``."""
    return torch.log(2 * _uncertainty_scale(binary) * losses)


def _uncertainty_scale(binary: torch.Tensor) -> torch.Tensor:
    """Kendall et al.'s ``a_k``: ``1 / (2 sigma^2)`` for a Gaussian likelihood, ``1 / sigma^2`` for a softmax."""
    return torch.where(binary, 1.0, 0.5)


def dwa_weights(last: torch.Tensor, before: torch.Tensor, temperature: float) -> torch.Tensor:
    """DWA's multipliers from the last two period-mean losses ``[..., K]``:
    ``m_k = K exp(r_k / T) / sum_i exp(r_i / T)``, ``r_k = L_k(t-1) / L_k(t-2)``."""
    ratio = torch.where(before > 0, last / before.clamp_min(EPS), torch.ones_like(last))
    return last.shape[-1] * torch.softmax(ratio / temperature, -1)


def gradnorm_targets(
    norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, alpha: float, present: torch.Tensor
) -> torch.Tensor:
    """GradNorm's target gradient norms ``mean_k(G_k) * r_k^alpha`` (constants in its loss), with ``G_k`` the
    weighted tasks' gradient norms ``norms [..., K]``, ``r_k = Ltilde_k / mean(Ltilde)`` and
    ``Ltilde_k = L_k / L_k(0)``; means over the present tasks."""
    count = present.sum(-1, keepdim=True).clamp_min(1)
    inverse_rate = torch.where(present, losses / initial.clamp_min(EPS), torch.zeros_like(losses))
    rate = inverse_rate / (inverse_rate.sum(-1, keepdim=True) / count).clamp_min(EPS)
    mean_norm = torch.where(present, norms, torch.zeros_like(norms)).sum(-1, keepdim=True) / count
    return mean_norm * rate.pow(alpha)


def famo_weights(logits: torch.Tensor, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """FAMO's multipliers: the gradient of ``sum_k z_k log L_k / c`` is ``sum_k m_k grad L_k`` with
    ``m_k = z_k / (c L_k)``, ``c = sum_i z_i / L_i``, ``z = softmax(logits)`` (absent tasks: 0)."""
    z = torch.softmax(logits, -1)
    ratio = torch.where(present, z / (losses + EPS), torch.zeros_like(z))
    return ratio / ratio.sum(-1, keepdim=True).clamp_min(EPS)


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020): ``grads [..., K, N]`` -> ``[..., N]``, the sum over tasks of each task's gradient
    after removing, in a random order of the others, its component along every ``g_j`` it conflicts with
    (``g_i . g_j < 0``: ``g_i -= (g_i . g_j) / |g_j|^2 g_j``). Leading dimensions are independent runs (one
    random order per task, shared by the runs).

    Example:
        >>> pcgrad(torch.tensor([[1.0, 0.0], [-1.0, 1.0]])).tolist()  # (0.5, 0.5) + (0, 1)
        [0.5, 1.5]
    """
    k = grads.shape[-2]
    squared = (grads * grads).sum(-1).clamp_min(1e-30)  # (..., K)
    total = torch.zeros_like(grads[..., 0, :])
    for i in range(k):
        projected = grads[..., i, :].clone()  # (..., N)
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i:
                continue
            dot = (projected * grads[..., j, :]).sum(-1, keepdim=True)  # (..., 1)
            coefficient = torch.where(dot < 0, dot / squared[..., j : j + 1], torch.zeros_like(dot))
            projected = projected - coefficient * grads[..., j, :]
        total = total + projected
    return total


def cagrad(grads: torch.Tensor, c: float, iterations: int = 50, present: torch.Tensor | None = None) -> torch.Tensor:
    """CAGrad (Liu et al. 2021): ``grads [..., K, N]`` -> ``[..., N]``.

    With ``g_0`` the mean gradient and ``phi = c^2 |g_0|^2``, the task mixture ``w`` on the simplex minimises
    ``g_w . g_0 + sqrt(phi) |g_w|`` (``g_w = sum_k w_k g_k``; solved on the ``[K, K]`` Gram matrix by
    ``iterations`` Adam steps on ``w = softmax(theta)``, batched over runs); the update is
    ``d = (g_0 + sqrt(phi) / |g_w| g_w) / (1 + c^2)`` (the authors' rescaled form), returned times K so that
    ``c = 0`` gives the plain sum of the task gradients, as fixed weights do. ``present [..., K]``: the tasks
    with a label in the batch; the others (zero gradients) are left out of ``g_0``, ``w`` and K.

    Example:
        >>> cagrad(torch.eye(2), c=0.5).tolist()  # g_0 = (.5, .5), w = (.5, .5): 2 * 1.5 g_0 / 1.25
        [1.2000000476837158, 1.2000000476837158]
    """
    if present is None:
        present = torch.ones(grads.shape[:-1], dtype=torch.bool, device=grads.device)
    k = present.sum(-1, keepdim=True).clamp_min(1).double()  # (..., 1)
    g = grads.double()
    gram = g @ g.transpose(-1, -2)  # (..., K, K)
    scale = (gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / k).unsqueeze(-1).clamp_min(1e-30)
    gram = gram / scale  # scale-free for the solver; the update below uses the gradients themselves
    mean_gram = gram.sum(-1) / k  # (..., K): g_i . g_0
    root_phi = c * (gram.sum((-2, -1)).unsqueeze(-1) / k**2).clamp_min(0).sqrt().squeeze(-1)  # (...): c |g_0|
    absent = torch.where(present, 0.0, -math.inf).to(gram.dtype)  # an absent task gets no share of w
    theta = torch.zeros(gram.shape[:-1], dtype=gram.dtype, device=gram.device)  # (..., K)
    adam = _adam_state(theta)
    for _ in range(iterations):  # Adam on theta, the gradient by hand (no autograd graph per iteration)
        w = torch.softmax(theta + absent, -1)
        gram_w = (gram @ w.unsqueeze(-1)).squeeze(-1)  # (..., K)
        norm = ((w * gram_w).sum(-1, keepdim=True) + 1e-12).sqrt()  # |g_w|
        grad_w = mean_gram + root_phi.unsqueeze(-1) * gram_w / norm  # dF/dw
        _adam(theta, w * (grad_w - (w * grad_w).sum(-1, keepdim=True)), adam, 0.25)  # through the softmax
    w = torch.softmax(theta.detach() + absent, -1)  # (..., K)
    g_w = (w.unsqueeze(-1) * g).sum(-2)  # (..., N)
    g_0 = g.sum(-2) / k
    norm_w = g_w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    lam = c * g_0.norm(dim=-1, keepdim=True) / norm_w
    return (k * (g_0 + lam * g_w) / (1 + c * c)).to(grads.dtype)


def _adam(param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, weight_decay: float = 0.0) -> None:
    """One Adam step on a small state tensor, in place (betas 0.9, 0.999). Written here rather than
    a torch.optim.Adam so that the state is three plain tensors in the checkpoint and a step per run."""
    grad = grad + weight_decay * param
    state["step"] += 1
    state["m"].mul_(0.9).add_(grad, alpha=0.1)
    state["v"].mul_(0.999).addcmul_(grad, grad, value=0.001)
    t = float(state["step"])
    m_hat = state["m"] / (1 - 0.9**t)
    v_hat = state["v"] / (1 - 0.999**t)
    param.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    world = rank_and_world()[1]
    if world > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= world
    return t


# ------------------------------------------------------------------------------------------ the methods


@BALANCERS.register("fixed", BalancingConfig)
class Balancer:
    """Fixed weights (``m_k = 1``) and the interface every method shares (see the module docstring).

    Args:
        config: the ``train.balancing`` section.
        runs: the loop's runs (``task_weights``, ``binary_mask``, ``named_parameters()``, ``device``).
        train: the training config (``lr`` for methods whose own learning rate is 0, ``seed``).

    State tensors have the shape of the step's per-task losses (``[K]``, ``[R, K]``) and are created at the
    first step (or by :meth:`load_state_dict` on a resume).
    """

    eager_reason = ""  # why a CUDA graph cannot hold this method's step ("" = it can)
    state_names: tuple[str, ...] = ()

    def __init__(self, config: BalancingConfig, runs: Any, train: TrainConfig) -> None:
        self.config, self.runs, self.train = config, runs, train
        self.weights: torch.Tensor | None = None  # [..., K] multipliers m_k
        self.steps_per_period = 1

    # -- the interface
    def begin(self, steps_per_epoch: int) -> None:
        """Called by the loop before the first step of a fit."""
        self.steps_per_period = steps_per_epoch

    def backward(self, losses: BatchLosses) -> None:
        """Differentiate the balanced objective (inside the step)."""
        self.objective(losses).sum().backward()  # runs are independent: each run's gradient is its own loss's

    def observe(self, per_task: torch.Tensor, present: torch.Tensor) -> None:
        """Update the state from a finished step's losses ``L_k`` (detached, ``[..., K]``); outside the graph."""

    # -- helpers
    def objective(self, losses: BatchLosses) -> torch.Tensor:
        weighted = self.weighted(losses.per_task)
        self._ensure_state(weighted)
        return (self.weights * weighted).sum(-1) + losses.extra

    def weighted(self, per_task: torch.Tensor) -> torch.Tensor:
        """``L'_k = c_k L_k``."""
        return per_task * self.runs.task_weights

    def _ensure_state(self, like: torch.Tensor) -> None:
        if self.weights is None:
            self.weights = torch.ones_like(like.detach())
            self.init_state(self.weights)

    def init_state(self, ones: torch.Tensor) -> None:
        """Create the method's state tensors (shaped like ``ones``)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps (empty before the first step)."""
        if self.weights is None:
            return {}
        state = {"weights": self.weights}
        for name in self.state_names:
            value = getattr(self, name)
            if isinstance(value, dict):
                state.update({f"{name}.{k}": torch.as_tensor(v) for k, v in value.items()})
            else:
                state[name] = value
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        device = self.runs.device
        self.weights = state["weights"].to(device).clone()
        self.init_state(torch.ones_like(self.weights))  # may reset the weights; they are put back below
        for name in self.state_names:
            value = getattr(self, name)
            if isinstance(value, dict):
                for k in value:
                    loaded = state[f"{name}.{k}"]
                    value[k] = loaded.item() if loaded.dim() == 0 and k == "step" else loaded.to(device).clone()
            else:
                setattr(self, name, state[name].to(device).clone())
        self.weights.copy_(state["weights"])

    def record(self) -> list[dict[str, float]]:
        """Per run, what the history shows at an evaluation: ``balance/<task>`` multipliers and the last
        conflict measurement."""
        if self.weights is None:
            return [{} for _ in range(self.runs.num_runs)]
        rows = self.weights.reshape(-1, self.weights.shape[-1]).tolist()
        names = self.runs.task_names
        return [{f"balance/{t}": v for t, v in zip(names, row)} for row in rows]


def _adam_state(ones: torch.Tensor) -> dict:
    return {"m": torch.zeros_like(ones), "v": torch.zeros_like(ones), "step": 0}


@BALANCERS.register("uncertainty", UncertaintyConfig)
class Uncertainty(Balancer):
    """Kendall et al. 2018: learned log-variances ``s_k``; ``m_k = a_k exp(-s_k)``, ``s`` minimises
    ``sum_k a_k exp(-s_k) L'_k + s_k / 2`` (gradient ``-a_k exp(-s_k) L'_k + 1/2``, tasks absent from the
    batch untouched). See :func:`uncertainty_optimum`."""

    state_names = ("log_variance", "adam")

    def init_state(self, ones: torch.Tensor) -> None:
        self.log_variance = torch.full_like(ones, self.config.init)
        self.adam = _adam_state(ones)
        self._set_weights()

    def _set_weights(self) -> None:
        scale = _uncertainty_scale(self.runs.binary_mask.reshape(-1))
        self.weights.copy_(scale * torch.exp(-self.log_variance))

    def observe(self, per_task: torch.Tensor, present: torch.Tensor) -> None:
        losses = _mean_over_ranks(self.weighted(per_task).float())
        grad = 0.5 - self.weights * losses
        grad = torch.where(present, grad, torch.zeros_like(grad))
        before = self.log_variance.clone()
        _adam(self.log_variance, grad, self.adam, self.config.lr or self.train.lr)
        self.log_variance.copy_(torch.where(present, self.log_variance, before))
        self._set_weights()

    def record(self) -> list[dict[str, float]]:
        rows = super().record()
        if self.weights is not None:
            values = self.log_variance.reshape(len(rows), -1).tolist()
            for row, run in zip(rows, values):
                row.update({f"balance/log_variance/{t}": v for t, v in zip(self.runs.task_names, run)})
        return rows


@BALANCERS.register("dwa", DWAConfig)
class DWA(Balancer):
    """Liu et al. 2019: ``m = K softmax(r / T)`` with ``r_k`` the ratio of task k's mean loss over the last
    period (``every`` steps, default one epoch) to the period before; ``m = 1`` for the first two periods.
    Losses of batches where a task is absent do not enter its mean. See :func:`dwa_weights`."""

    state_names = ("period_sum", "period_count", "last", "before", "counters")

    def init_state(self, ones: torch.Tensor) -> None:
        zeros = torch.zeros_like(ones)
        self.period_sum, self.period_count = zeros.clone(), zeros.clone()
        self.last, self.before = zeros.clone(), zeros.clone()
        self.counters = torch.zeros(2, dtype=torch.long)  # steps in this period, periods completed

    def begin(self, steps_per_epoch: int) -> None:
        self.steps_per_period = self.config.every or steps_per_epoch

    def observe(self, per_task: torch.Tensor, present: torch.Tensor) -> None:
        losses = self.weighted(per_task).float()
        self.period_sum += torch.where(present, losses, torch.zeros_like(losses))
        self.period_count += present.float()
        self.counters[0] += 1
        if int(self.counters[0]) < self.steps_per_period:
            return
        sums = _mean_over_ranks(torch.stack([self.period_sum, self.period_count]))
        mean = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1), self.last)
        self.before, self.last = self.last, mean
        self.period_sum.zero_()
        self.period_count.zero_()
        self.counters[0] = 0
        self.counters[1] += 1
        if int(self.counters[1]) >= 2:
            self.weights.copy_(dwa_weights(self.last, self.before, self.config.temperature))


@BALANCERS.register("famo", FAMOConfig)
class FAMO(Balancer):
    """Liu et al. 2023 (Fast Adaptive Multitask Optimization): the step follows ``sum_k z_k grad log L'_k``
    (normalised, :func:`famo_weights`); after it, the logits ``xi`` take an Adam step (weight decay ``gamma``)
    along ``J_softmax(xi)^T delta`` with ``delta_k = log L'_k(t-1) - log L'_k(t)``, so that tasks whose loss
    fell least gain weight. ``L(t)`` is the next batch's loss (the paper's code re-evaluates the same batch after
    the step: one more forward per step); a task absent at either step gets ``delta = 0``."""

    state_names = ("logits", "previous", "previous_present", "adam")

    def init_state(self, ones: torch.Tensor) -> None:
        self.logits = torch.zeros_like(ones)
        self.previous = torch.ones_like(ones)
        self.previous_present = torch.zeros_like(ones, dtype=torch.bool)
        self.adam = _adam_state(ones)

    def objective(self, losses: BatchLosses) -> torch.Tensor:
        weighted = self.weighted(losses.per_task)
        self._ensure_state(weighted)
        self.weights.copy_(famo_weights(self.logits, weighted.detach(), losses.present))
        return (self.weights * weighted).sum(-1) + losses.extra

    def observe(self, per_task: torch.Tensor, present: torch.Tensor) -> None:
        current = _mean_over_ranks(self.weighted(per_task).float())
        both = present & self.previous_present
        delta = torch.where(both, (self.previous + EPS).log() - (current + EPS).log(), torch.zeros_like(current))
        z = torch.softmax(self.logits, -1)
        grad = z * (delta - (z * delta).sum(-1, keepdim=True))  # J_softmax^T delta
        # as the paper's code: xi.grad = J^T delta and Adam descends, so tasks whose loss fell least gain weight
        _adam(self.logits, grad, self.adam, self.config.lr, self.config.weight_decay)
        self.previous = torch.where(present, current, self.previous)
        self.previous_present = present.clone()


class GradientBalancer(Balancer):
    """The methods that need each task's gradient on the shared parameters (GradNorm on the last shared layer,
    surgery on all of them). The shared entries are read off the first batch's task gradients
    (:func:`~mtrank.evaluate.conflict.shared_parameter_masks`; K more backward passes, once)."""

    eager_reason = "needs each task's gradient and data-dependent choices inside the step"

    def __init__(self, config: BalancingConfig, runs: Any, train: TrainConfig) -> None:
        super().__init__(config, runs, train)
        self.mode = "loop" if config.task_gradients == "auto" else config.task_gradients
        self.masks: dict[str, torch.Tensor] = {}
        self.shared: list[tuple[str, torch.Tensor]] = []

    def find_shared(self, weighted: torch.Tensor, present: torch.Tensor) -> bool:
        """Read the shared entries off the first batch in which every task has a label; False until then (the
        step then trains the plain weighted sum)."""
        if self.masks:
            return True
        if not bool(_mean_over_ranks(present.float()).gt(0).all()):
            return False
        self.masks = shared_masks(self.runs, weighted)
        if not self.masks:
            raise ValueError(
                f"train.balancing.type={self.config.type!r} works on parameters shared by two or more tasks; this "
                "model has none (one task, or every part owned by one task): use train.balancing: fixed"
            )
        params = dict(self.runs.named_parameters())
        self.shared = [(name, params[name]) for name in self.masks]
        return True

    def task_grads(self, weighted: torch.Tensor, shared: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """``[..., K, N]``: each task's gradient on the shared entries of ``shared``, flattened (ranks averaged)."""
        run_dims = weighted.dim() - 1
        grads = task_gradients(weighted, [p for _, p in shared], self.mode, retain_graph=True)
        flat = [(g * self.masks[name]).flatten(1 + run_dims) for (name, _), g in zip(shared, grads)]  # (K, *runs, n)
        return _mean_over_ranks(torch.cat(flat, -1).movedim(0, -2))  # (*runs, K, N)


def shared_masks(runs: Any, weighted: torch.Tensor, retain_graph: bool = True) -> dict[str, torch.Tensor]:
    """The shared entries of ``runs``' parameters, from the task gradients of ``weighted [..., K]``."""
    named = list(runs.named_parameters())
    grads = task_gradients(weighted, [p for _, p in named], "loop", retain_graph=retain_graph)
    return shared_parameter_masks({n: g for (n, _), g in zip(named, grads)}, weighted.dim() - 1)


@BALANCERS.register("gradnorm", GradNormConfig)
class GradNorm(GradientBalancer):
    """Chen et al. 2018: ``G_k = m_k |grad_W L'_k|`` on the last shared layer ``W``; ``m`` takes an Adam step on
    ``sum_k |G_k - T_k|`` (targets :func:`gradnorm_targets`, constants; gradient ``sign(G_k - T_k) |grad_W L'_k|``)
    and is renormalised to ``sum_k m_k = K``. ``L'_k(0)``: the task's first loss seen."""

    state_names = ("initial", "adam")

    last_layer: list[tuple[str, torch.Tensor]] = []

    def find_shared(self, weighted: torch.Tensor, present: torch.Tensor) -> bool:
        if self.last_layer or not super().find_shared(weighted, present):
            return bool(self.last_layer)
        layers = shared_layers(self.masks)
        experts = [name for name in layers if ".experts." in name]
        self.layer = (experts or list(layers))[-1]
        self.last_layer = [(name, p) for name, p in self.shared if name in layers[self.layer]]
        return True

    def init_state(self, ones: torch.Tensor) -> None:
        self.initial = torch.full_like(ones, math.nan)
        self.adam = _adam_state(ones)

    def backward(self, losses: BatchLosses) -> None:
        weighted = self.weighted(losses.per_task)
        self._ensure_state(weighted)
        if not self.find_shared(weighted, losses.present):
            return super().backward(losses)
        norms = self.task_grads(weighted, self.last_layer).norm(dim=-1)  # (..., K) |grad_W L'_k|
        (self.weights * weighted).sum(-1).add(losses.extra).sum().backward()
        present = losses.present
        current = _mean_over_ranks(weighted.detach().float())
        self.initial = torch.where(present & torch.isnan(self.initial), current, self.initial)
        targets = gradnorm_targets(self.weights * norms, current, self.initial, self.config.alpha, present)
        grad = torch.where(present, torch.sign(self.weights * norms - targets) * norms, torch.zeros_like(norms))
        _adam(self.weights, grad, self.adam, self.config.lr or self.train.lr)
        self.weights.clamp_(min=1e-3)
        self.weights.mul_(self.weights.shape[-1] / self.weights.sum(-1, keepdim=True))


class Surgery(GradientBalancer):
    """Gradient surgery: the shared entries' gradient becomes ``combine(g_1..g_K)`` (+ ``extra``'s own)."""

    def combine(self, grads: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``grads [..., K, N]`` (zero for a task absent from the batch), ``present [..., K]`` -> ``[..., N]``."""
        raise NotImplementedError

    def backward(self, losses: BatchLosses) -> None:
        weighted = self.weighted(losses.per_task)
        self._ensure_state(weighted)
        if not self.find_shared(weighted, losses.present):
            return super().backward(losses)
        run_dims = weighted.dim() - 1
        grads = self.task_grads(weighted, self.shared)  # (*runs, K, N)
        (weighted.sum(-1) + losses.extra).sum().backward()  # every parameter: sum_k g_k + extra
        change = self.combine(grads, losses.present) - grads.sum(-2)  # (*runs, N)
        offset = 0
        for name, p in self.shared:
            mask = self.masks[name]
            size = p[(0,) * run_dims].numel() if run_dims else p.numel()
            part = change[..., offset : offset + size].reshape(p.shape)
            p.grad.add_(part * mask)
            offset += size


@BALANCERS.register("pcgrad", PCGradConfig)
class PCGrad(Surgery):
    """Yu et al. 2020: :func:`pcgrad` on the shared parameters (its random order from ``train.seed``, saved in
    checkpoints)."""

    state_names = ("generator_state",)

    def init_state(self, ones: torch.Tensor) -> None:
        self.generator = torch.Generator().manual_seed(self.train.seed)

    @property
    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    @generator_state.setter
    def generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())

    def combine(self, grads: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return pcgrad(grads, self.generator)  # an absent task's zero gradient conflicts with nothing


@BALANCERS.register("cagrad", CAGradConfig)
class CAGrad(Surgery):
    """Liu et al. 2021: :func:`cagrad` on the shared parameters."""

    def combine(self, grads: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return cagrad(grads, self.config.c, self.config.iterations, _mean_over_ranks(present.float()) > 0)


def make_balancer(config: TrainConfig, runs: Any) -> Balancer:
    """The balancer ``train.balancing`` names, for ``runs``."""
    section = config.balancing
    return BALANCERS.module(section.type, "train.balancing.type")(section, runs, config)


# ------------------------------------------------------------------------------------------ conflict measurement


def measure_conflict(runs: Any, losses: BatchLosses) -> list[dict]:
    """Per run, the conflict report (:func:`~mtrank.evaluate.conflict.conflict_stats`) of one batch's losses:
    the weighted tasks' gradients on the shared parameters, their cosines per shared layer and overall
    (Gram matrices averaged over data-parallel ranks)."""
    weighted = losses.per_task * runs.task_weights
    run_dims = weighted.dim() - 1
    named = list(runs.named_parameters())
    grads = task_gradients(weighted, [p for _, p in named], "loop")
    grads = {n: g for (n, _), g in zip(named, grads)}
    masks = shared_parameter_masks(grads, run_dims)
    grams = gram_matrices(grads, masks, shared_layers(masks), run_dims)
    grams = {k: _mean_over_ranks(v) for k, v in grams.items()}
    count = weighted.shape[0] if run_dims else 1
    return [
        conflict_stats({k: (v[r] if run_dims else v) for k, v in grams.items()}, runs.task_names) for r in range(count)
    ]


def diagnose(model: Any, data: Any, batches: int = 8, batch_size: int = 1024, seed: int = 0) -> dict[str, Any]:
    """Task conflict and gates of a trained model on labelled rows: what ``mtrank diagnose`` reports.

    ``batches`` random batches of ``batch_size`` rows (seeded): on each, the weighted tasks' gradients on the
    shared parameters (evaluation mode: no dropout); the Gram matrices are averaged over the batches, so the
    cosine is that of minibatch gradients as training sees them (not of the full-data gradient, which is
    closer to 1 when the batches' noise averages out). Beside it, each pair's cosine on every batch (its
    spread says how noisy one measurement is) and the gate report of
    :func:`~mtrank.evaluate.gates.model_gate_report` on the same rows.
    """
    from mtrank.evaluate.gates import model_gate_report

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    named = list(model.named_parameters())
    task_weights = torch.tensor([t.weight for t in model.tasks], device=model.device)
    funnel = FunnelSpec.from_config(model.config)
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    per_batch = []
    try:
        for index in order.split(batch_size):
            part = data.take(index)
            out = model(part.dense.to(model.device), part.sparse.to(model.device))
            losses = batch_losses(
                out.task_logits,
                out.aux_loss,
                part.labels.to(model.device),
                model.binary_mask,
                task_weights,
                None if part.weights is None else part.weights.to(model.device),
                funnel=funnel and funnel.in_eval(out.task_logits, len(model.tasks)),
            )
            weighted = losses.per_task * task_weights
            grads = {n: g for (n, _), g in zip(named, task_gradients(weighted, [p for _, p in named]))}
            masks = masks or shared_parameter_masks(grads)
            grams = gram_matrices(grads, masks, shared_layers(masks))
            per_batch.append(conflict_stats(grams, model.task_names))
            totals = {k: totals.get(k, 0) + v for k, v in grams.items()}
    finally:
        model.train(was_training)
    if not per_batch:
        raise ValueError("diagnose needs at least one labelled row")
    stats = conflict_stats({k: v / len(per_batch) for k, v in totals.items()}, model.task_names)
    spread = {pair: [b["pairs"][pair]["cosine"] for b in per_batch] for pair in stats["pairs"]}
    gates = model_gate_report(model, data.take(order))
    return {
        "rows": len(order),
        "batches": len(per_batch),
        "batch_size": batch_size,
        "conflict": stats,
        "batch_cosines": spread,
        "gates": gates,
    }


__all__ += ["measure_conflict", "flat_record", "shared_masks", "diagnose"]
