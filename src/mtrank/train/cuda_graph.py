"""GPU fast path: the whole training step (batch gather, forward, loss, backward, Adam) in one CUDA graph.

On a GPU, a small model's step is a few hundred tiny kernels; launching them from Python leaves the GPU idle.
Captured once in a CUDA graph (``torch.cuda.CUDAGraph``), a step is one ``replay()``: the batch's row ids are
copied into a static index buffer, and the graph gathers the rows from the training tensors (already on the
GPU), runs forward and backward and the fused, capturable Adam update.

The Trainer selects this path by itself (:func:`cuda_graph_plan`) when it is safe:

* device is CUDA;
* random masks and noise inside the step (dropout, gate dropout, noisy top-k gates, bias dropout) are
  fine: the captured random kernels draw from the generator's advancing Philox offset, the eager step's
  stream (graphed == eager, bit for bit, on an H100);
* learning-rate schedules are fine: the lr is a GPU tensor that the scheduler updates in place and the
  captured Adam kernel reads at every replay; so is gradient clipping (``clip_grad_norm_`` computes the norm
  and the scale on the GPU, with no host sync);
* full batches only: the last, shorter batch of an epoch runs eagerly.

Otherwise, and on CPU, training runs the eager step. Warm-up: the first ``warmup_steps`` real steps run
eagerly on a side stream (cuBLAS/allocator initialisation must not happen during capture, as the PyTorch
CUDA-graph notes require); the next step is captured and every later full batch replays it. If capture
fails, the exception is recorded in :attr:`GraphedTrainStep.failure` and the rest of the fit runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtrank.config import TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel


def cuda_graph_plan(
    model: MultiTaskModel, config: TrainConfig, device: torch.device, allow_randomness: bool = True
) -> tuple[bool, str]:
    """Whether a training step may be captured in a CUDA graph, and why (or why not).

    Random masks and noise inside the step are fine: PyTorch's CUDA graphs advance the generator's Philox
    offset at every replay exactly as the eager step would (measured on an H100: dropout, gate dropout, noisy
    gates and bias dropout give bit-identical weights graphed and eager, for the Trainer and for the vmapped
    ensemble). ``allow_randomness=False`` refuses them, for callers that need a deterministic step.
    """
    if device.type != "cuda":
        return False, f"device is {device.type}, CUDA graphs need a CUDA device"
    random = model.random_sources()
    if random and not allow_randomness:
        return False, f"{random[0]} (random numbers inside the step)"
    scheduled = config.schedule != "constant" or config.warmup_steps
    if scheduled and any(p.dtype != torch.float32 for p in model.parameters()):
        return False, "a learning-rate schedule with non-float32 parameters (the graph can follow only a float32 lr)"
    if config.optimizer not in ("adam", "adamw"):
        return False, f"optimizer {config.optimizer!r}"
    return True, "CUDA graph of the whole step (gather, forward, backward, fused capturable Adam)"


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale the gradients of ``optimizer``'s parameters to global L2 norm <= ``max_norm`` (no host sync, so
    it can be captured; the eager and graphed steps both call this)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


class GraphedTrainStep:
    """Training steps on rows of ``train``: full batches after the first ``warmup_steps`` by graph replay.

    Args:
        loss_fn: ``TensorData batch -> scalar loss`` (the trainer's loss, autocast included; autocast's weight
            cache must be off while capturing, see the PyTorch CUDA-graph notes).
        optimizer: a capturable optimizer (``Adam(..., capturable=True)``) over the model's parameters.
        train: the training split, on the GPU; its tensors must stay alive and in place while the graph lives.
            Anything with ``take(index)`` (a batch for ``loss_fn``) and ``labels`` serves, e.g. the ensemble's
            :class:`~mtrank.train.ensemble.EnsembleData`.
        batch_size: rows per step, or the shape of the row-index tensor (``(R, B)`` for an ensemble of R runs);
            only batches of exactly this shape go through the graph.
        warmup_steps: eager steps (on a side stream) before the capture.
        grad_clip: clip the gradients' global L2 norm to this before the optimizer step (0 = off), as the
            Trainer's eager step does.
    """

    def __init__(
        self,
        loss_fn: Callable[[TensorData], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        train: TensorData,
        batch_size: int | tuple[int, ...],
        warmup_steps: int = 3,
        grad_clip: float = 0.0,
    ) -> None:
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip
        self.optimizer = optimizer
        self.train = train
        self.batch_size = batch_size
        self.warmup_steps = warmup_steps
        self.device = train.labels.device
        self.index_shape = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
        self.static_index = torch.zeros(self.index_shape, dtype=torch.long, device=self.device)
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture run on this one side stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: torch.Tensor | None = None
        self.failure: str = ""
        self.eager_steps = 0
        self.replays = 0

    def serves(self, train: TensorData, batch_size: int) -> bool:
        """Whether this step (and its graph) can train on ``train``: the very same tensors, the same batch."""
        names = ("dense", "sparse", "labels", "weights", "teacher")
        same = all(getattr(self.train, name, None) is getattr(train, name, None) for name in names)
        return same and self.batch_size == batch_size

    def _step(self, index: torch.Tensor, set_to_none: bool | None = True) -> torch.Tensor:
        """One eager step (also what the graph records). ``set_to_none=None``: leave the gradients alone."""
        if set_to_none is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        loss = self.loss_fn(self.train.take(index))
        loss.backward()
        if self.grad_clip > 0:
            clip_gradients(self.optimizer, self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def step(self, index: torch.Tensor) -> torch.Tensor:
        """One training step on rows ``index`` (int64 on the GPU); returns the loss."""
        if tuple(index.shape) != self.index_shape:  # the short last batch of an epoch
            self.eager_steps += 1
            # once captured, the gradients live in the graph's pool: zero them in place, never free them
            return self._step(index, set_to_none=self.graph is None)
        self.static_index.copy_(index)
        if self.graph is None and not self.failure:
            if self.eager_steps < self.warmup_steps:
                return self._side_stream_step()
            try:
                self._capture()
            except Exception as err:  # noqa: BLE001 - any capture failure means: stay eager
                self.graph, self.static_loss = None, None
                self.failure = f"{type(err).__name__}: {err}"
                torch.cuda.synchronize(self.device)
        if self.graph is None:
            self.eager_steps += 1
            return self._step(self.static_index)
        self.graph.replay()
        self.replays += 1
        return self.static_loss

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        return self.stream

    def _side_stream_step(self) -> torch.Tensor:
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self._step(self.static_index)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.eager_steps += 1
        return loss

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates .grad in its own pool
        graph = torch.cuda.CUDAGraph()
        # capture on the warm-up stream: the BLAS handles and workspaces it created are reused, not created
        # mid-capture
        with torch.cuda.graph(graph, stream=self._side_stream()):
            static_loss = self._step(self.static_index, set_to_none=None)
        self.graph, self.static_loss = graph, static_loss
