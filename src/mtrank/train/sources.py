"""Batch sources: what the one training loop iterates over.

A source yields batch *keys* for an epoch, deterministically for a given seed and epoch, from a given batch
on (so a resumed run replays exactly the batches it had not trained on), and turns a key into tensors:

* :class:`InMemorySource`: tensors already on the training device; a key is a row-index tensor, ``[B]`` for
  one run (or one data-parallel rank) or ``[R, B]`` for R stacked runs each with its own shuffled order, and
  the batch is a gather (which a CUDA graph records too). Data-parallel ranks take their own ``batch_size``
  rows of each global batch of the same order.
* :class:`StreamSource`: encoded batches streamed from files (:class:`~mtrank.data.streaming.EncodedStream`)
  by reader processes; a key is the batch itself, already on the device: on CUDA the readers' items (groups of
  batches) are pinned and a :class:`~mtrank.train.prefetch.Prefetcher` copies the next ones on a side stream
  while the (graphed) step runs; an item is split into batches on the device (its ids widened to int64 there),
  and the graphed step refills its static inputs from them in place. The next epoch's readers start before
  this epoch ends, so that only the first epoch waits for readers to start.

The loop also tells ``keys`` the most batches it will take (``limit``): a hint (the keys are the same without
it), with which a stream starts no readers for an epoch that will not be read.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from mtrank.data.tensors import TensorData
from mtrank.train.cuda_graph import batch_tensors
from mtrank.train.prefetch import Prefetcher

# the next epoch's readers start this many start-ups before the epoch's end (estimated): about the time they take
# to have their PREFETCH_FACTOR items each ready (a start-up for the first, then one record batch read per item
# while their shuffle buffers grow: data.shuffle_start), so that the new epoch does not wait for its second items
STARTUP_MARGIN = 4.0


class InMemorySource:
    """Batches of rows of in-memory tensors; epoch ``e`` of run ``r`` follows ``randperm(N)`` seeded by
    ``seeds[r] * 1_000_003 + e``.

    Args:
        data: :class:`TensorData` (one run) or :class:`~mtrank.train.ensemble.EnsembleData` (R runs); anything
            with ``len()``, ``take(index)`` and ``to(device)``.
        batch_size: rows per step (per rank).
        seeds: the shuffle seed of each run; an int for one run (keys ``[B]``), a list for R runs (keys ``[R, B]``).
        device: the training device (the data is moved there once).
        world, rank: data-parallel ranks; each takes its own rows of each global batch, the last incomplete
            global batch is dropped.

    Example:
        >>> from mtrank.data import make_synthetic
        >>> source = InMemorySource(make_synthetic(n=10, seed=0), batch_size=4, seeds=0, device=torch.device("cpu"))
        >>> source.steps_per_epoch, [len(k) for k in source.keys(epoch=0, skip=1)]
        (3, [4, 2])
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seeds: int | list[int],
        device: torch.device,
        world: int = 1,
        rank: int = 0,
    ) -> None:
        self.data = data.to(device)
        self.batch_size, self.device, self.world, self.rank = batch_size, device, world, rank
        self.stacked = isinstance(seeds, list)
        self.seeds = list(seeds) if self.stacked else [seeds]
        self.rows = len(data)
        if world > 1:
            if self.rows < batch_size * world:
                raise ValueError(
                    f"{self.rows} training rows cannot fill one batch of {batch_size} on each of {world} ranks"
                )
            self.steps_per_epoch = self.rows // (batch_size * world)
        else:
            self.steps_per_epoch = math.ceil(self.rows / batch_size)

    def keys(self, epoch: int, skip: int = 0, limit: int | None = None) -> Iterator[torch.Tensor]:
        """Row indices of the batches of ``epoch``, from batch ``skip`` on (``limit``: unused)."""
        generators = [torch.Generator().manual_seed(s * 1_000_003 + epoch) for s in self.seeds]
        orders = torch.stack([torch.randperm(self.rows, generator=g) for g in generators]).to(self.device)  # (R, N)
        for i in range(skip, self.steps_per_epoch):
            first = (i * self.world + self.rank) * self.batch_size
            index = orders[:, first : first + self.batch_size]  # (R, B)
            yield index if self.stacked else index[0]

    def batch(self, key: torch.Tensor) -> TensorData:
        return self.data.take(key)

    def identity(self) -> tuple:
        """What a graphed step built for this source reads: its tensors."""
        return tuple(batch_tensors(self.data))

    def is_full(self, key: torch.Tensor) -> bool:
        return key.shape[-1] == self.batch_size

    def rows_in(self, key: torch.Tensor) -> int:
        """Rows one run trains on in this step, over all ranks."""
        return key.shape[-1] * self.world

    def describe(self) -> dict:
        return {"rows": self.rows, "batch_size": self.batch_size, "seeds": self.seeds, "world": self.world}

    def position(self) -> dict:
        return {}

    def check_position(self, saved: dict) -> None:
        """Nothing to check: the same data, seeds and ranks give the same batches."""


class StreamSource:
    """Encoded batches streamed from files by ``workers`` reader processes (0 = in this process).

    Epochs overlap: the next epoch's readers (:class:`~mtrank.data.streaming.EpochReaders`) start before this
    epoch ends and fill their shuffle buffers while its last items are consumed, so that their first items are
    ready when it ends: once the time left in the epoch (rows left, counted from ``rows``, at the rate the items
    have arrived so far) is under :data:`STARTUP_MARGIN` times the first epoch's start-up (from its reader
    processes started to its first item), or at the latest when ``ahead`` items are left. Each epoch's batches
    are the same as without the overlap (its readers read their own epoch, whatever the stream's epoch is later).
    When the consumer stops before the end of an epoch (early stopping, the last step, an error: the generator of
    :meth:`keys` is closed), both epochs' readers stop; :meth:`close` stops readers started for an epoch that
    will not be read.

    Args:
        stream: an :class:`~mtrank.data.streaming.EncodedStream` (its batch size and seed fix the batches).
        workers: reader processes; resuming with another number reads the epoch in another order (a warning
            says so).
        device: the training device (each reader item is moved there; on CUDA from pinned memory, ``prefetch``
            items ahead on a side stream).
        rows: training rows (counted from the files when not given).
        prefetch: reader items (``group`` batches each) in flight to the GPU
            (:class:`~mtrank.train.prefetch.Prefetcher`).
        group: batches per item sent by a reader process (None: the default of
            :func:`~mtrank.data.streaming.stream_loader`); resuming with another group, like another number of
            workers, reads the epoch in another order.
        pin_memory: readers' items in page-locked memory (None: on CUDA; False is only for comparisons).
        ahead: reader items before the end of an epoch at which the next epoch's readers start at the latest
            (None: those the DataLoader asks the readers for ahead of the consumer, ``workers *``
            :data:`~mtrank.data.streaming.PREFETCH_FACTOR`; 0: no overlap, each epoch's readers start when
            it does). Nothing to overlap with 0 workers.
    """

    def __init__(
        self,
        stream: Any,
        workers: int,
        device: torch.device,
        rows: int | None = None,
        prefetch: int = 2,
        group: int | None = None,
        pin_memory: bool | None = None,
        ahead: int | None = None,
    ) -> None:
        from mtrank.data.streaming import GROUP_ROWS, PREFETCH_FACTOR

        self.stream, self.workers, self.device, self.prefetch = stream, workers, device, prefetch
        self.group = group if group is not None else max(1, GROUP_ROWS // stream.batch_size)
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self.ahead = workers * PREFETCH_FACTOR if ahead is None else ahead
        self.next_readers: Any = None  # the next epoch's EpochReaders, once started
        self.startup_s: float | None = None  # the first epoch's readers: seconds from their start to the 1st item
        self.rows = rows if rows is not None else stream.count_rows()
        self.batch_size = stream.batch_size
        self.steps_per_epoch = max(1, math.ceil(self.rows / self.batch_size))
        self.stacked = False

    def keys(self, epoch: int, skip: int = 0, limit: int | None = None) -> Iterator[TensorData]:
        """The encoded batches of ``epoch`` on the device, from batch ``skip`` on (skipped batches are read and
        dropped before any copy). ``limit``: the most batches the consumer will take (None: not known); when
        this epoch holds that many, no readers start for the next one."""
        from mtrank.data.streaming import skip_batches

        self.stream.set_epoch(epoch)
        readers = self._readers_of(epoch)
        most = self.steps_per_epoch + max(self.workers, 1) - 1 - skip  # each reader's last batch may be short
        items = self._starting_next(readers, start_next=limit is None or limit > most)
        try:
            for item in Prefetcher(skip_batches(items, skip), self.device, self.prefetch):
                yield from item.batches()
        except BaseException:  # stopped before the end of the epoch (GeneratorExit) or failed
            self.close()
            raise
        finally:
            readers.close()

    def start(self, epoch: int = 0) -> None:
        """Start the readers of ``epoch`` now, before training asks for its batches: they fill their shuffle
        buffers while the caller builds the model (``mtrank.fit`` calls this before the model exists). Started
        before this process initialises CUDA, they are forked (nothing to unpickle); with CUDA as the device the
        forkserver that later epochs' readers start from is started now too, in the background (a fresh Python
        that imports torch: its first reader waited 8.3 s for it on the H200, 2.6 s on a 2-core CPU). The first
        epoch's start-up (:attr:`startup_s`) then counts from here, model build included: the next epoch's readers
        start earlier than they need to, and wait with their items ready. Readers started for an epoch that
        training does not begin with (a resumed run) are stopped when it begins."""
        from mtrank.data.streaming import start_forkserver

        if self.workers > 0 and self.device.type == "cuda":
            start_forkserver()
        if self.next_readers is None:
            self.next_readers = self.readers(epoch)

    def readers(self, epoch: int) -> Any:
        """The reader processes of ``epoch``, started now (:class:`~mtrank.data.streaming.EpochReaders`)."""
        from mtrank.data.streaming import EpochReaders

        return EpochReaders(self.stream, self.workers, self.pin_memory, self.group, epoch=epoch)

    def close(self) -> None:
        """Stop the readers started for the next epoch, if any (a consumer that reads no further epoch)."""
        if self.next_readers is not None:
            self.next_readers.close()
            self.next_readers = None

    def _readers_of(self, epoch: int) -> Any:
        """The readers started ahead for ``epoch``, else new ones (those started for another epoch stop)."""
        started, self.next_readers = self.next_readers, None
        if started is not None and started.epoch == epoch:
            return started
        if started is not None:
            started.close()
        return self.readers(epoch)

    def _starting_next(self, readers: Any, start_next: bool) -> Iterator[Any]:
        """``readers``' items; the next epoch's readers start on the way (see the class docstring)."""
        overlap = start_next and self.workers > 0 and self.ahead > 0
        left, latest = self.rows, self.ahead * self.group * self.batch_size  # rows
        first, since_first = None, 0  # the first item's arrival; rows received after it
        for item in readers:
            rows, now = int(item.sizes.sum()), time.perf_counter()
            left -= rows
            if first is None:
                first = now
                if self.startup_s is None:
                    self.startup_s = now - readers.started
            else:
                since_first += rows
            if overlap and self.next_readers is None:
                rate = since_first / max(now - first, 1e-9)  # rows/s (0 at the first item)
                if left <= max(latest, rate * STARTUP_MARGIN * self.startup_s):
                    self.next_readers = self.readers(readers.epoch + 1)
            yield item

    def batch(self, key: TensorData) -> TensorData:
        return key

    def identity(self) -> tuple:
        return (self.stream,)

    def is_full(self, key: TensorData) -> bool:
        return len(key) == self.batch_size

    def rows_in(self, key: TensorData) -> int:
        return len(key)

    def describe(self) -> dict:
        return {"rows": self.rows, "batch_size": self.batch_size, "seed": self.stream.seed}

    def position(self) -> dict:
        return {"workers": self.workers, "group": self.group}

    def check_position(self, saved: dict) -> None:
        for name, what in (("workers", "reader processes"), ("group", "batches per reader item")):
            now = getattr(self, name)
            if saved.get(name, now) != now:
                warnings.warn(
                    f"resuming a streaming run with {now} {what}; the checkpoint was written with {saved[name]}: "
                    "the rest of the epoch is read in a different batch order",
                    stacklevel=3,
                )
