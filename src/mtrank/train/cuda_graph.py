"""GPU fast path: the whole training step (batch gather, forward, loss, backward, clip, Adam) in one CUDA graph.

On a GPU, a small model's step is a few hundred tiny kernels; launching them from Python leaves the GPU idle.
Captured once in a CUDA graph (``torch.cuda.CUDAGraph``), a step is one ``replay()``: the batch (a row-index
tensor into training tensors already on the GPU, or a batch of tensors streamed from files) is copied into
static input buffers, and the graph runs the step that :class:`~mtrank.train.step.TrainStep` runs eagerly.

:func:`cuda_graph_plan` decides when that is exact:

* device is CUDA;
* random masks and noise inside the step (dropout, gate dropout, noisy top-k gates, bias dropout) are
  fine: the captured random kernels draw from the generator's advancing Philox offset, the eager step's
  stream (graphed == eager, bit for bit, on an H100);
* learning-rate schedules are fine: the lr is a GPU tensor that the scheduler updates in place and the
  captured Adam kernel reads at every replay; so is gradient clipping (computed on the GPU, no host sync);
* full batches only: a shorter batch (the last of an epoch) runs eagerly;
* ``train.sparse: rowwise_adagrad`` is fine: its step has fixed shapes (the batch's lookups, not its distinct
  rows: :func:`~mtrank.train.optim.summed_rows`) and a tensor lr; ``lazy_adam`` is not (host step counter).

Warm-up: the first ``warmup_steps`` full batches run eagerly on a side stream (cuBLAS / allocator
initialisation must not happen during capture, as the PyTorch CUDA-graph notes require); the next one is
captured and every later full batch replays it. With ``train.compile`` the first warm-up step compiles the
step's forward + loss (and, in its backward, AOTAutograd's backward), so the capture records the compiled
kernels and nothing is compiled during the capture; inductor's own CUDA graphs stay off.
If capture fails, the exception is recorded in :attr:`GraphedStep.failure`, a warning says so, and training
goes on eagerly (the trainer's ``step_path`` then reads ``eager``, or ``compiled``, with the failure as its
reason). A failed capture leaves the CUDA generator marked as capturing, so every later random draw outside a
graph would raise "Offset increment outside graph capture";
:func:`release_generator` gives it back its seed and offset in a fresh state.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mtrank.config import TrainConfig
from mtrank.data.tensors import TensorData


def cuda_graph_plan(
    random_sources: list[str],
    parameters: list[torch.Tensor],
    config: TrainConfig,
    device: torch.device,
    allow_randomness: bool = True,
) -> tuple[bool, str]:
    """Whether a training step may be captured in a CUDA graph, and why (or why not).

    Args:
        random_sources: what draws random numbers in the step (``model.random_sources()``).
        parameters: the trained parameters (their dtypes decide whether a schedule can be graphed).
        config: the training config.
        device: the training device.
        allow_randomness: False refuses steps that draw random numbers, for callers that need a
            deterministic step.
    """
    if device.type != "cuda":
        return False, f"device is {device.type}, CUDA graphs need a CUDA device"
    if config.sparse.optimizer == "lazy_adam":
        return False, "train.sparse.optimizer='lazy_adam' keeps its step counter on the host (eager step)"
    if random_sources and not allow_randomness:
        return False, f"{random_sources[0]} (random numbers inside the step)"
    scheduled = config.schedule != "constant" or config.warmup_steps
    if scheduled and any(p.dtype != torch.float32 for p in parameters):  # (a bf16 table under train.sparse too)
        return False, "a learning-rate schedule with non-float32 parameters (the graph can follow only a float32 lr)"
    return True, "CUDA graph of the whole step (gather, forward, backward, fused capturable Adam)"


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of a step's input (a row-index tensor, or a batch such as :class:`TensorData`), in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    return [t for t in values if t is not None]


def _static_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.empty_like(batch)
    values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    return TensorData(*(None if t is None else torch.empty_like(t) for t in values))


class GraphedStep:
    """A step function replayed from a CUDA graph for full batches.

    Args:
        step: ``(batch, set_to_none) -> outputs``: one eager training step (zero the gradients, unless
            ``set_to_none`` is None, then forward, loss, backward, clip, optimizer step); returns tensors.
        is_full: which batches go through the graph (all of them have the same shapes).
        free_gradients: sets the gradients to None, so that the captured backward allocates them in the
            graph's memory pool.
        device: the GPU.
        warmup_steps: eager full-batch steps (on a side stream) before the capture.
    """

    def __init__(
        self,
        step: Callable[[Any, bool | None], tuple[torch.Tensor, ...]],
        is_full: Callable[[Any], bool],
        free_gradients: Callable[[], None],
        device: torch.device,
        warmup_steps: int = 3,
    ) -> None:
        self.step_fn, self.is_full, self.free_gradients, self.device = step, is_full, free_gradients, device
        self.warmup_steps = warmup_steps
        self.static_batch: Any = None
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture run on this one side stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: tuple[torch.Tensor, ...] | None = None
        self.failure: str = ""
        self.eager_steps = 0
        self.replays = 0

    def __call__(self, batch: Any) -> tuple[torch.Tensor, ...]:
        if not self.is_full(batch):  # a short batch
            self.eager_steps += 1
            # once captured, the gradients live in the graph's pool: zero them in place, never free them
            return self.step_fn(batch, self.graph is None)
        if self.static_batch is None:
            self.static_batch = _static_like(batch)
        for static, value in zip(batch_tensors(self.static_batch), batch_tensors(batch)):
            static.copy_(value, non_blocking=True)
        if self.graph is None and not self.failure:
            if self.eager_steps < self.warmup_steps:
                return self._side_stream_step()
            try:
                self._capture()
            except Exception as err:  # noqa: BLE001 - any capture failure means: stay eager
                self.graph, self.static_out = None, None
                self.failure = f"{type(err).__name__}: {err}"
                torch.cuda.synchronize(self.device)
                release_generator(self.device)
                warnings.warn(f"CUDA graph capture failed, training goes on eagerly: {self.failure}", stacklevel=2)
        if self.graph is None:
            self.eager_steps += 1
            return self.step_fn(self.static_batch, True)
        self.graph.replay()
        self.replays += 1
        assert self.static_out is not None
        return self.static_out

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        return self.stream

    def _side_stream_step(self) -> tuple[torch.Tensor, ...]:
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.step_fn(self.static_batch, True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.eager_steps += 1
        return out

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # capture on the warm-up stream: the BLAS handles and workspaces it created are reused, not created
        # mid-capture; the gradients are set to None first, so the graph's backward allocates them in its pool.
        # thread_local: only this thread's unsafe calls are refused during the capture, so a streaming source's
        # pin-memory thread may go on pinning the next items (under the default "global" mode its cudaHostAlloc
        # invalidated the capture: found on the H200 with the Parquet readers running)
        self.free_gradients()
        with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
            static_out = self.step_fn(self.static_batch, None)
        self.graph, self.static_out = graph, static_out


def release_generator(device: torch.device) -> None:
    """After a failed capture: the device's default CUDA generator keeps its seed and Philox offset in a fresh
    state object, no longer marked as capturing (``clone_state`` copies seed and offset, not the capture flag)."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if hasattr(generator, "clone_state"):
        generator.graphsafe_set_state(generator.clone_state())
