"""Prefetching batches to the GPU: the host-to-device copy of the next batches overlaps the current step.

:class:`Prefetcher` wraps an iterator of batches (a :class:`~mtrank.data.tensors.TensorData`, a reader's
:class:`~mtrank.data.streaming.Group` of batches, or any dataclass, named tuple or tensor) held in host memory,
ideally pinned (the reader processes' items are pinned by the DataLoader's pin-memory thread); their tensors
move, anything else in them (None, a numpy array of batch sizes) stays as it is. On CUDA it keeps ``depth``
batches in flight: each is copied with ``non_blocking=True`` on a side stream, and an event recorded after the
copy; when the training loop takes a batch, its stream waits on that event (a wait on the GPU, not on the host)
and the batch's tensors are marked as used by that stream (``record_stream``), so the caching allocator does not
hand their memory to the next copy while a step still reads it. A host batch with a ``finished()`` method (a
reader's item page-locked in place) is told when its copy is complete, when the loop takes it, so that its
memory can be reused. The graphed step then refills its static input buffers from these device tensors in place
(:class:`~mtrank.train.cuda_graph.GraphedStep`): a device-to-device copy, no host sync.

On CPU (or any non-CUDA device) the prefetcher is the plain iterator: the same batches, in the same order,
moved with ``.to(device)`` (a no-op for a CPU batch).

Example:
    >>> from mtrank.data import make_synthetic
    >>> data = make_synthetic(n=6, seed=0)
    >>> batches = [data.take(torch.arange(i, i + 2)) for i in range(0, 6, 2)]
    >>> out = list(Prefetcher(iter(batches), torch.device("cpu")))
    >>> all(torch.equal(a.dense, b.dense) for a, b in zip(out, batches))
    True
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to each of its tensors (a tensor, or a dataclass or named tuple whose
    other fields are left as they are)."""

    def apply(value: Any) -> Any:
        return fn(value) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if dataclasses.is_dataclass(batch):
        changes = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        return dataclasses.replace(batch, **{k: apply(v) for k, v in changes.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(apply(v) for v in batch))
    raise TypeError(f"cannot prefetch a {type(batch).__name__}: give tensors, or a dataclass or named tuple of them")


class Prefetcher:
    """Batches of ``batches`` on ``device``, the next ``depth`` already copied (see the module docstring).

    Args:
        batches: host batches, in training order.
        device: the training device.
        depth: batches in flight on CUDA (>= 1); ignored elsewhere.
    """

    def __init__(self, batches: Iterator[Any], device: torch.device, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self.batches, self.device, self.depth = iter(batches), device, depth
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.copies = 0  # batches copied to the device

    def __iter__(self) -> Iterator[Any]:
        if not self.cuda:
            for batch in self.batches:
                self.copies += 1
                yield map_tensors(batch, lambda t: t.to(self.device))
            return
        in_flight: deque[tuple[Any, Any, torch.cuda.Event]] = deque()
        first = True  # the first batch is handed over as soon as its copy is issued: the depth fills up after it
        for batch in self.batches:
            in_flight.append(self._copy(batch))
            if len(in_flight) > self.depth or first:
                first = False
                yield self._take(*in_flight.popleft())
        while in_flight:
            yield self._take(*in_flight.popleft())

    def _copy(self, batch: Any) -> tuple[Any, Any, torch.cuda.Event]:
        assert self.stream is not None
        # no wait on the main stream: a copy's memory comes from the side stream's pool, and a consumed batch's
        # memory returns to it only after the main stream's work on it (record_stream in _take)
        with torch.cuda.stream(self.stream):
            moved = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copies += 1
        return batch, moved, event

    def _take(self, host: Any, batch: Any, event: torch.cuda.Event) -> Any:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        finished = getattr(host, "finished", None)
        if finished is not None:  # the host memory may go back to its owner (a reader) once the copy is done
            event.synchronize()  # issued ``depth`` batches ago: done by now, as a rule
            finished()
        return map_tensors(batch, lambda t: _used_by(t, current))


def _used_by(tensor: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
    tensor.record_stream(stream)
    return tensor
