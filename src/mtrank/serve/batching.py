"""Request coalescing: concurrent scoring calls share one forward pass.

The service runs one forward pass at a time (the model already uses every core). While a pass runs, new
calls wait in a queue; when it ends, one waiting caller becomes the leader, takes every queued call (in
arrival order, up to ``max_rows`` rows), scores them as one batch and hands each caller its rows. Nothing
waits on a timer: under light load a call runs alone at once, under heavy load batches grow by themselves,
and a GEMM over many rows is cheaper per row than many small ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Call:
    dense: np.ndarray
    sparse: np.ndarray
    scores: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.dense)


class CoalescingScorer:
    """Wraps ``scorer(dense, sparse) -> scores [B, K]`` so that concurrent calls are batched together.

    Args:
        scorer: the scoring function (a :class:`mtrank.serve.backends.Scorer`).
        max_rows: most rows in one forward pass (a call larger than this still runs, alone).

    Attributes:
        batches: number of forward passes run; calls: number of calls served (``calls / batches`` is the mean
            number of requests per pass).
    """

    def __init__(self, scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_rows: int = 4096):
        self.scorer, self.max_rows = scorer, max_rows
        self.condition = threading.Condition()
        self.pending: list[_Call] = []
        self.busy = False
        self.batches = 0
        self.calls = 0

    def __call__(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        call = _Call(np.asarray(dense, dtype=np.float32), np.asarray(sparse, dtype=np.int64))
        with self.condition:
            self.pending.append(call)
            self.condition.notify_all()
        while True:
            with self.condition:
                while not call.done and self.busy:
                    self.condition.wait()
                if call.done:
                    break
                self.busy = True  # this caller leads the next pass
                batch = self._take()
            self._run(batch)
        if call.error is not None:
            raise call.error
        return call.scores

    def _take(self) -> list[_Call]:
        batch = [self.pending.pop(0)]  # the oldest call always goes, whatever its size
        rows = batch[0].rows
        while self.pending and rows + self.pending[0].rows <= self.max_rows:
            rows += self.pending[0].rows
            batch.append(self.pending.pop(0))
        return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            dense = np.concatenate([c.dense for c in batch]) if len(batch) > 1 else batch[0].dense
            sparse = np.concatenate([c.sparse for c in batch]) if len(batch) > 1 else batch[0].sparse
            scores = self.scorer(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()  # (rows, K)
            offsets = np.cumsum([0] + [c.rows for c in batch])
            for call, start, end in zip(batch, offsets[:-1], offsets[1:]):
                call.scores = scores[start:end]
        except BaseException as err:  # every caller of the batch gets the error, none waits forever
            for call in batch:
                call.error = err
        finally:
            with self.condition:
                for call in batch:
                    call.done = True
                self.batches += 1
                self.calls += len(batch)
                self.busy = False
                self.condition.notify_all()
