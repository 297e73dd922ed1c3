"""Request coalescing: concurrent calls share one run (one encoding pass, one forward pass).

One run at a time (the model already uses every core its process has). While a run goes on, new calls wait
in a queue; when it ends, one waiting caller becomes the leader, takes every queued call (in arrival order,
up to ``max_rows`` rows), runs them as one batch and hands each caller its own result. Nothing waits on a
timer: under light load a call runs alone at once, under heavy load batches grow by themselves. A batch costs
less than its calls alone: a GEMM over many rows is cheaper per row than many small ones, and the encoders'
fixed cost per column (~26 pyarrow calls per request) is paid once per batch
(:meth:`mtrank.serve.service.ScoringService.answer`; measured in docs/serving.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class _Call:
    item: Any
    rows: int
    wake: threading.Event = field(default_factory=threading.Event)  # set when done, or made the leader
    result: Any = None
    done: bool = False


class Coalescer:
    """Wraps ``run(items) -> results`` (one result per item, in order; an exception instance as a result is
    raised to that item's caller alone) so that concurrent calls ``coalescer(item)`` are run together.

    Each waiting caller sleeps on its own event: when a run ends, its callers are woken with their results and
    the oldest waiting caller is woken to lead the next run. No broadcast: with 32 waiting threads, waking all
    of them after every run (a shared condition) took a fifth of the service's CPU time.

    Args:
        run: runs a batch of items.
        rows: the rows of an item (what ``max_rows`` counts).
        max_rows: most rows in one run (a call larger than this still runs, alone).

    Attributes:
        batches: number of runs; calls: number of calls served (``calls / batches`` is the mean number of
            calls per run). ``condition`` is notified when a call is queued (for observers: tests).
    """

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], rows: Callable[[Any], int], max_rows: int = 4096):
        self.run, self.rows, self.max_rows = run, rows, max_rows
        self.condition = threading.Condition()
        self.pending: list[_Call] = []
        self.busy = False  # a run is going on, or its leader is taking the next batch
        self.batches = 0
        self.calls = 0

    def __call__(self, item: Any) -> Any:
        call = _Call(item, self.rows(item))
        with self.condition:
            self.pending.append(call)
            self.condition.notify_all()
            lead = not self.busy
            self.busy = True
        if not lead:
            call.wake.wait()
        while not call.done:  # this caller leads: its call is the oldest queued
            with self.condition:
                batch = self._take()
            self._run(batch)
            self._hand_over()
        if isinstance(call.result, BaseException):
            raise call.result
        return call.result

    @contextmanager
    def held(self) -> Iterator[None]:
        """Calls made inside the block queue up as if a run were going on; at its end they run (tests)."""
        with self.condition:
            self.busy = True
        try:
            yield
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        """After a run: the oldest queued caller leads the next one, else nothing is running."""
        with self.condition:
            if self.pending:
                self.pending[0].wake.set()
            else:
                self.busy = False

    def _take(self) -> list[_Call]:
        batch = [self.pending.pop(0)]  # the oldest call always goes, whatever its size
        rows = batch[0].rows
        while self.pending and rows + self.pending[0].rows <= self.max_rows:
            rows += self.pending[0].rows
            batch.append(self.pending.pop(0))
        return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            results = self.run([c.item for c in batch])
            for call, result in zip(batch, results, strict=True):
                call.result = result
        except BaseException as err:  # every caller of the batch gets the error, none waits forever
            for call in batch:
                call.result = err
        finally:
            with self.condition:
                self.batches += 1
                self.calls += len(batch)
            for call in batch:
                call.done = True
                call.wake.set()


def forward_many(
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray]:
    """Score several ``(dense [n_i, F_dense], sparse [n_i, F_cat])`` in one forward pass: ``[scores [n_i, K]]``."""
    if not inputs:
        return []
    dense = np.concatenate([d for d, _ in inputs]) if len(inputs) > 1 else inputs[0][0]  # (sum n_i, F_dense)
    sparse = np.concatenate([s for _, s in inputs]) if len(inputs) > 1 else inputs[0][1]  # (sum n_i, F_cat)
    scores = scorer(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()  # (sum n_i, K)
    offsets = np.cumsum([0] + [len(d) for d, _ in inputs])
    return [scores[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


class CoalescingScorer(Coalescer):
    """``scorer(dense, sparse) -> scores [B, K]`` with concurrent calls sharing one forward pass.

    Args:
        scorer: the scoring function (a :class:`mtrank.serve.backends.Scorer`).
        max_rows: most rows in one forward pass (a call larger than this still runs, alone).
    """

    def __init__(self, scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_rows: int = 4096):
        self.scorer = scorer
        super().__init__(
            lambda items: forward_many(self.scorer, items), rows=lambda item: len(item[0]), max_rows=max_rows
        )

    def __call__(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return super().__call__((np.asarray(dense, dtype=np.float32), np.asarray(sparse, dtype=np.int64)))
