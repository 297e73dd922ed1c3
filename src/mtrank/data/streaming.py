"""Streaming: encoded training batches from files larger than memory; shuffle buffer, reader processes.

The training files are opened as one ``pyarrow.dataset`` (:func:`mtrank.data.readers.open_dataset`) and split
into pieces: Parquet row groups, or whole CSV files. Each epoch the pieces are shuffled (seed + epoch) and
dealt to the reader processes (``torch.utils.data.DataLoader`` workers), piece ``i`` to worker ``i mod W``.
A worker reads its pieces as record batches of ``read_batch_rows``, encodes them with the fitted
:class:`~mtrank.data.encoders.FeatureEncoder` (vectorised; lookups built before the fork) straight into a
shuffle buffer:

    when the buffer holds ``>= capacity`` rows: permute it, emit batches until ``capacity / 2`` rows are left,
    keep those (they mix with the next rows read); at the end, permute and emit what is left. Until it has
    first held ``capacity`` rows, it emits sooner: once it holds ``start`` rows (``data.shuffle_start`` x
    capacity, default half), half of each chunk added goes out (in whole batches) and the other half stays,
    so the buffer still grows to ``capacity`` while a reader's first items (what training waits for, each
    epoch) need half the rows read.

The rows a worker emits, in order, are cut into batches of ``batch_size`` (only the last one of an epoch may be
shorter), and ``group`` consecutive batches travel to the trainer's process as one item, a :class:`Group`.
How a row gets there, with as few copies and as little per-batch work as we could measure:

1. **Buffer.** :class:`ShuffleBuffer` keeps its rows in arrays allocated once (``capacity + one chunk`` rows):
   a record batch is encoded into its free rows in place, the rows emitted are *positions* in those arrays,
   and the kept rows are gathered to the front before the next chunk (one ``np.take`` per array). Its batches
   are exactly the old concatenate-permute-index buffer's, in the same order.
2. **Item.** A :class:`GroupWriter` gathers the emitted rows straight into the item's arrays with one
   ``np.take`` per array per run of rows (not per batch); in a reader process those arrays are views of one
   shared-memory segment per item, so sending the item moves no data and costs one file descriptor (a tensor
   that is not already in shared memory is copied into a fresh segment when it is sent, and each segment costs
   a descriptor, a connection to pass it, and a mapping). When the items are pinned (on CUDA), the pin thread
   copies each one on arrival and releases it (:meth:`Group.pin_memory`), and the reader rewrites released
   segments instead of faulting in fresh ones; unpinned items are never rewritten (the batches are their views).
   A recycled segment travels with its first item only; later items from it are a few numbers (their arrays'
   places in it), and the trainer's process keeps it mapped (:data:`SEGMENTS`) until the reading ends. On CUDA
   it is page-locked in place once (``cudaHostRegister``), so its items skip the pin copy.
3. **Ids as int32.** When every sparse column's vocabulary fits (``max(encoder.vocab_sizes) <= 2**31``), the
   buffer and the items hold the ids as int32: 26 ids are 104 bytes a row, not 208, for every copy on the way
   (buffer, item, pinning, host-to-device). :meth:`Group.batches` widens them to the int64 the model takes,
   once per item, on the device the item is on (after the copy to the GPU, on the GPU).
4. **Arrow's allocator.** A reader process decodes with Arrow's jemalloc pool (where pyarrow has it): with the
   default pool (mimalloc) a forked reader spent more CPU per row, and varied more, in A/B runs on the
   development machine (docs/benchmarks.md, "Files to the graphed step").

In the trainer's process the DataLoader's pin thread puts each item in page-locked memory (``pin_memory``, on
CUDA: in place, or a copy); :class:`~mtrank.train.prefetch.Prefetcher` copies whole items to the GPU on a side
stream (and then hands a page-locked segment back to its reader: :meth:`Group.finished`), and
:meth:`Group.batches` splits an item back into batches (views, no copy). Items arrive worker by worker in
turn, so the batch order depends on the number of workers and on ``group`` (fixed for a given seed, epoch,
workers and group). Readers are forked, or started by a forkserver once this process has initialised CUDA
(:func:`reader_context`); a reader reads its first item as it starts, before the DataLoader's first request
(which waits until every reader is started). The readers of one epoch are an :class:`EpochReaders`: they start
when it is made, so the next epoch's can start (and fill their shuffle buffers) while this one's last items are
consumed. ``EncodedStream.trace`` (a file name; off by default) has each reader append its way to its first item
(docs/benchmarks.md, "Files to the graphed step", 9.).

Memory per worker: the buffer's ``capacity + read_batch_rows`` rows and a scratch of about half that (the kept
rows on their way to the front), one record batch and the encoder's per-slice temporaries, up to
:data:`RECYCLED_ITEMS` items' segments when pinned, whatever the size of the files; the DataLoader keeps
:data:`PREFETCH_FACTOR` items per worker in flight. Twice that for the end of an epoch whose next epoch's
readers started early.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import pickle
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtrank.config.experiment import ExperimentConfig
from mtrank.data.encoders import FeatureEncoder, LabelTransforms
from mtrank.data.errors import DataError
from mtrank.data.reader_trace import ReaderTrace
from mtrank.data.readers import check_columns, encode_labels, encode_weights, open_dataset
from mtrank.data.tensors import TensorData

GROUP_ROWS = 65_536  # rows a reader sends as one item by default (``group = GROUP_ROWS // batch_size``, >= 1)
INT32_IDS = 2**31  # ids travel as int32 when every vocabulary has at most this many ids
PREFETCH_FACTOR = 4  # items the DataLoader asks each reader for ahead of the consumer
RECYCLED_ITEMS = 8  # items' buffers a reader keeps for reuse (in flight: its PREFETCH_FACTOR, and the pin thread's)
HEADER = 64  # bytes before an item's arrays in its buffer: its lease (int32), then alignment


class ShuffleBuffer:
    """Rows in, shuffled rows out, holding at most ``capacity + one input chunk`` rows (module docstring, 1.).

    :meth:`add` (or :meth:`reserve`, write the rows in place, :meth:`commit`) and :meth:`drain` return the
    *positions* (in :attr:`storage`) of the rows to emit, in emission order; they stay valid until the next
    :meth:`add` or :meth:`reserve`. :meth:`push` and :meth:`flush` return copies, batch by batch. The rows of a
    buffer are stored with ``dtypes`` (default: the first chunk's).

    Example:
        >>> buf = ShuffleBuffer(capacity=4, seed=0)
        >>> out = [b for chunk in np.arange(10).reshape(5, 2) for b in buf.push([chunk], batch_size=2)]
        >>> out += list(buf.flush(batch_size=2))
        >>> sorted(int(v) for b in out for v in b[0])
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(self, capacity: int, seed: int, dtypes: list | None = None, start: int | None = None) -> None:
        self.capacity = max(1, capacity)
        self.start = self.capacity if start is None else max(1, min(start, self.capacity))  # rows before the 1st
        self.filled = False  # whether it has held ``capacity`` rows yet
        self.rng = np.random.default_rng(seed)
        self.dtypes = dtypes
        self.storage: list[np.ndarray] = []  # rows 0..rows-1 of each array, in the buffer's order
        self.scratch: list[np.ndarray] = []  # where the kept rows are gathered before they move to the front
        self.rows = 0
        self.kept: np.ndarray | None = None  # positions of the rows kept by the last emission, in their new order

    def add(self, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
        """Append a chunk of rows; the positions of the rows to emit now (full batches, or none)."""
        rows = len(arrays[0])
        for view, chunk in zip(self.reserve(rows, [(a.shape[1:], a.dtype) for a in arrays]), arrays):
            view[:] = chunk
        return self.commit(rows, batch_size)

    def reserve(self, rows: int, columns: list[tuple[tuple, np.dtype]]) -> list[np.ndarray]:
        """Views of the next ``rows`` rows of the storage (``columns``: each array's row shape and dtype), to
        write a chunk into in place; :meth:`commit` adds them."""
        self._compact()
        self._allocate(columns, self.rows + rows)
        return [store[self.rows : self.rows + rows] for store in self.storage]

    def commit(self, rows: int, batch_size: int) -> np.ndarray:
        """Add the ``rows`` rows written after the last :meth:`reserve`; the positions of the rows to emit now
        (full batches, or none)."""
        self.rows += rows
        self.filled = self.filled or self.rows >= self.capacity
        if self.filled:
            if self.rows < self.capacity:
                return np.empty(0, dtype=np.int64)
            return self._emit(batch_size, keep=self.capacity // 2)
        if self.rows < self.start:
            return np.empty(0, dtype=np.int64)
        return self._emit(batch_size, keep=self.rows - rows // 2)  # growing: half of this chunk goes out

    def drain(self) -> np.ndarray:
        """The positions of every row left (the end of the stream)."""
        self._compact()
        return self._emit(1, keep=0) if self.rows else np.empty(0, dtype=np.int64)

    def push(self, arrays: list[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
        """:meth:`add`, with the emitted rows copied out as batches of ``batch_size``."""
        yield from self._copies(self.add(arrays, batch_size), batch_size)

    def flush(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """:meth:`drain`, as batches of ``batch_size`` (the last one may be shorter)."""
        yield from self._copies(self.drain(), batch_size)

    def _copies(self, positions: np.ndarray, batch_size: int) -> Iterator[list[np.ndarray]]:
        for start in range(0, len(positions), batch_size):
            yield [store[positions[start : start + batch_size]] for store in self.storage]

    def _emit(self, batch_size: int, keep: int) -> np.ndarray:
        order = self.rng.permutation(self.rows)
        emit = self.rows - keep
        emit -= emit % batch_size  # full batches while streaming (batch_size 1 at the end: every row)
        self.kept, self.rows = order[emit:], self.rows - emit
        return order[:emit]

    def _compact(self) -> None:
        """Move the rows kept by the last emission to the front, in their new order (one gather per array)."""
        if self.kept is None:
            return
        k = len(self.kept)
        if not self.scratch or len(self.scratch[0]) < k:  # typically capacity / 2 + part of a batch
            size = max(k, len(self.storage[0]) // 2)
            self.scratch = [np.empty((size, *s.shape[1:]), s.dtype) for s in self.storage]
        for store, scratch in zip(self.storage, self.scratch):
            np.take(store, self.kept, axis=0, out=scratch[:k], mode="clip")  # "clip": no buffering; all valid
            store[:k] = scratch[:k]
        self.kept = None

    def _allocate(self, columns: list[tuple[tuple, np.dtype]], rows: int) -> None:
        """Storage for ``rows`` rows (allocated at the first chunk: ``capacity`` + its rows; grown if needed)."""
        if self.storage and rows <= len(self.storage[0]):
            return
        size = max(rows, self.capacity + rows - self.rows)
        dtypes = self.dtypes or [dtype for _, dtype in columns]
        storage = [np.empty((size, *shape), dtype=d) for (shape, _), d in zip(columns, dtypes)]
        for new, old in zip(storage, self.storage):
            new[: self.rows] = old[: self.rows]
        self.storage = storage


class Group(NamedTuple):
    """What a reader process sends: ``len(sizes)`` consecutive batches, each array's rows concatenated
    (``dense [R, F_dense]``, ``sparse [R, F_cat]`` int32 or int64, ``labels [R, K]``, ``weights [R] | None``)
    and ``sizes``, the rows of each batch (a numpy array: it stays on the host when the arrays move).

    ``lease`` (``[1]`` int32, in the item's buffer) is set while the trainer's process may read the buffer; a
    reader rewrites a buffer of its pool only once the lease is 0 (:meth:`release`: after the pin copy).
    ``segment``: the key of that pooled buffer (:class:`GroupWriter`) and whether this item is the first sent
    from it; such an item travels as a few numbers once the trainer's process has the buffer mapped
    (:func:`_received`).
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None
    sizes: np.ndarray
    lease: torch.Tensor | None = None
    segment: tuple[tuple, bool] | None = None

    def batches(self) -> Iterator[TensorData]:
        """The batches, as views of the arrays, ids widened to int64 (once per item, where the item is)."""
        sizes = self.sizes.tolist()
        arrays = [self.dense.split(sizes), self.sparse.long().split(sizes), self.labels.split(sizes)]
        weights = self.weights.split(sizes) if self.weights is not None else [None] * len(sizes)
        return map(TensorData, *arrays, weights)

    def __reduce__(self):
        """Pickled (sent by a reader process): a pooled buffer goes with its first item only; later items from it
        carry their arrays' places in it (dtype, shape, strides, byte offset)."""
        if self.segment is None:
            return Group, tuple(self)
        key, first = self.segment
        raw = torch.empty(0, dtype=torch.uint8).set_(self.dense.untyped_storage())  # the whole buffer
        places = [None if t is None else _place(t) for t in (self.dense, self.sparse, self.labels, self.weights)]
        return _received, (key, raw if first else None, places, _place(self.lease), self.sizes)

    def drop(self, batches: int) -> Group:
        """The item without its first ``batches`` batches (views)."""
        rows = slice(int(self.sizes[:batches].sum()), None)
        weights = None if self.weights is None else self.weights[rows]
        sizes = self.sizes[batches:]
        return Group(self.dense[rows], self.sparse[rows], self.labels[rows], weights, sizes, self.lease, self.segment)

    def pin_memory(self) -> Group:
        """The item in page-locked memory (what the DataLoader's pin thread calls): the item itself when its
        buffer is a reader's pooled one that CUDA could page-lock in place (once per buffer: :func:`_page_locked`;
        the buffer is then released by :meth:`finished`, after the copy to the GPU); else a copy, and the reader may
        reuse this item's buffer at once."""
        if self.segment is not None and _page_locked(self.segment[0]):
            return self._replace(lease=None)  # (the lease stays here: :meth:`finished` releases the buffer)
        weights = None if self.weights is None else self.weights.pin_memory()
        pinned = Group(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory(), weights, self.sizes)
        self.release()
        return pinned

    def finished(self) -> None:
        """Called once this process reads the item's host memory no more: its copy to the device is complete
        (:class:`~mtrank.train.prefetch.Prefetcher`), or it was skipped. A buffer page-locked in place goes back
        to its reader (other items were released when they were copied, or are not pooled)."""
        if self.segment is not None and self.segment[0] in PAGE_LOCKED:
            SEGMENTS[self.segment[0]][:4].view(torch.int32).fill_(0)  # the buffer's lease (GroupWriter._buffer)

    def release(self) -> None:
        """Tell the reader that this process reads the item's buffer no more (call it after copying the item)."""
        if self.lease is not None:
            self.lease.fill_(0)


SEGMENTS: dict[tuple, torch.Tensor] = {}  # in the trainer's process: the readers' pooled buffers, mapped once
PAGE_LOCKED: set[tuple] = set()  # those of SEGMENTS registered with CUDA as page-locked (cudaHostRegister)
_NOT_LOCKABLE: set[tuple] = set()  # those whose registration failed
PAGE_LOCK = True  # False: pooled buffers are copied into pinned memory too (the path before; for comparisons)


def _page_locked(key: tuple) -> bool:
    """Whether the pooled buffer ``key`` is page-locked in place, registering it with CUDA the first time
    (``cudaHostRegister``): its items then go to the GPU with no copy into pinned memory. False without CUDA
    or when the registration fails (the item is copied, as before)."""
    if key in PAGE_LOCKED:
        return True
    raw = SEGMENTS.get(key)
    if raw is None or not PAGE_LOCK or key in _NOT_LOCKABLE or not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0)) != 0:  # 0: cudaSuccess
        _NOT_LOCKABLE.add(key)  # not tried again: its items are copied
        getattr(cudart, "cudaGetLastError", lambda: None)()  # the failure is not left for a later check
        return False
    PAGE_LOCKED.add(key)
    return True


def _forget_segments(session: int) -> None:
    """Unmap (and unregister) the pooled buffers of a reading that ended; items still held keep theirs mapped."""
    keys = [key for key in SEGMENTS if key[0] == session]
    locked = [key for key in keys if key in PAGE_LOCKED]
    if locked:
        torch.cuda.synchronize()  # no copy from them in flight
        for key in locked:
            torch.cuda.cudart().cudaHostUnregister(SEGMENTS[key].data_ptr())
            PAGE_LOCKED.discard(key)
    for key in keys:
        del SEGMENTS[key]
        _NOT_LOCKABLE.discard(key)


def _place(tensor: torch.Tensor) -> tuple:
    """Where a view lies in its buffer: dtype, shape, strides, byte offset."""
    return tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset() * tensor.element_size()


def _view(raw: torch.Tensor, place: tuple) -> torch.Tensor:
    dtype, shape, stride, offset = place
    return torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), offset // dtype.itemsize, shape, stride)


def _received(key: tuple, raw: torch.Tensor | None, places: list, lease: tuple, sizes: np.ndarray) -> Group:
    """An item of a pooled buffer, unpickled in the trainer's process: the buffer comes with the first item sent
    from it and stays mapped here (:data:`SEGMENTS`, until :func:`stream_items` ends): no file descriptor to
    pass, no mapping to make and unmake, no page to fault in again, per item."""
    if raw is not None:
        SEGMENTS[key] = raw
    raw = SEGMENTS[key]
    dense, sparse, labels, weights = (None if p is None else _view(raw, p) for p in places)
    return Group(dense, sparse, labels, weights, sizes, _view(raw, lease), (key, False))


class GroupWriter:
    """Emitted rows -> :class:`Group` items of ``group`` batches of ``batch_size`` rows (module docstring, 2.).

    The rows go straight from the shuffle buffer's storage into the item's arrays (one ``np.take`` per array per
    call); with ``shared`` the arrays are views of one shared-memory segment per item. With ``recycle`` (the
    trainer's process copies each item on arrival: the pin thread) the writer keeps up to :data:`RECYCLED_ITEMS`
    buffers and rewrites one whose lease was released (:meth:`Group.release`); while none is, it takes a new one.
    A fresh shared-memory segment costs a page fault per 4 KiB page on first write: ~10 ms for a 65,536-row item
    on the benchmark machine, ~6x the gather itself. With ``key`` (shared, recycled: a reader process), items of
    a pooled buffer carry ``segment = ((*key, slot), first)``: the buffer travels with its first item only.
    """

    def __init__(
        self, batch_size: int, group: int, shared: bool, recycle: bool = False, key: tuple | None = None
    ) -> None:
        self.batch_size, self.rows_per_item, self.shared = batch_size, batch_size * group, shared
        self.recycle, self.key = recycle, key
        self.pool: list[torch.Tensor] = []  # buffers that may be rewritten once their lease is released
        self.arrays: list[torch.Tensor] = []  # the open item's arrays
        self.lease: torch.Tensor | None = None  # and its lease, when its buffer is one of the pool's
        self.slot: int | None = None  # and the buffer's place in the pool
        self.sent: set[int] = set()  # slots whose buffer went with an item already
        self.filled = 0  # rows written to them

    def write(self, storage: list[np.ndarray], positions: np.ndarray) -> Iterator[Group]:
        """Gather rows ``positions`` of ``storage``; yield each item as it fills."""
        done = 0
        while done < len(positions):
            if not self.arrays:
                self.arrays = self._allocate(storage)
            n = min(self.rows_per_item - self.filled, len(positions) - done)
            for store, out in zip(storage, self.arrays):
                target = out.numpy()[self.filled : self.filled + n]
                np.take(store, positions[done : done + n], axis=0, out=target, mode="clip")
            self.filled += n
            done += n
            if self.filled == self.rows_per_item:
                yield self._finish()

    def close(self) -> Iterator[Group]:
        """The last item, if rows are left (its last batch may be short)."""
        if self.filled:
            yield self._finish()

    def _finish(self) -> Group:
        full, rest = divmod(self.filled, self.batch_size)
        sizes = np.array([self.batch_size] * full + ([rest] if rest else []), dtype=np.int64)
        arrays = [a[: self.filled] for a in self.arrays]
        weights = arrays[3] if len(arrays) > 3 else None
        segment = None
        if self.key is not None and self.shared and self.slot is not None:
            segment = ((*self.key, self.slot), self.slot not in self.sent)
            self.sent.add(self.slot)
        item = Group(arrays[0], arrays[1], arrays[2], weights, sizes, self.lease, segment)
        self.arrays, self.lease, self.slot, self.filled = [], None, None, 0
        return item

    def _allocate(self, storage: list[np.ndarray]) -> list[torch.Tensor]:
        """The item's arrays, carved from one buffer (64-byte aligned), in shared memory with ``shared``."""
        rows = self.rows_per_item
        dtypes = [torch.from_numpy(s[:0]).dtype for s in storage]
        shapes = [(rows, *s.shape[1:]) for s in storage]
        sizes = [int(np.prod(shape)) * s.itemsize for shape, s in zip(shapes, storage)]
        offsets = np.cumsum([HEADER] + [-(-b // 64) * 64 for b in sizes])
        raw, self.lease, self.slot = self._buffer(int(offsets[-1]))
        return [
            raw[int(o) : int(o) + b].view(dtype).view(shape)
            for o, b, dtype, shape in zip(offsets, sizes, dtypes, shapes)
        ]

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """An item's buffer (uint8), its lease and its slot in the pool: a released one of the pool, else a new
        one (pooled while the pool has room)."""
        for slot, raw in enumerate(self.pool):
            lease = raw[:4].view(torch.int32)
            if len(raw) == nbytes and lease.item() == 0:
                return raw, lease.fill_(1), slot
        if self.shared:  # allocated in shared memory (share_memory_() would copy a tensor into a new segment)
            raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
        else:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        if not self.recycle or len(self.pool) == RECYCLED_ITEMS:
            return raw, None, None
        self.pool.append(raw)
        return raw, raw[:4].view(torch.int32).fill_(1), len(self.pool) - 1


class EncodedStream(IterableDataset):
    """Batches of encoded rows streamed from the training files (see the module docstring).

    Yields :class:`mtrank.data.tensors.TensorData` batches of ``batch_size`` rows (the last one of an epoch
    may be smaller), labels on the model's scale when ``labels`` transforms them; :meth:`groups` yields them
    ``group`` at a time, as a reader process sends them. Call :meth:`set_epoch` before each epoch to reshuffle.
    """

    def __init__(
        self,
        path: str,
        config: ExperimentConfig,
        encoder: FeatureEncoder,
        batch_size: int,
        seed: int = 0,
        labels: LabelTransforms | None = None,
    ) -> None:
        super().__init__()
        self.path, self.config, self.encoder, self.labels = str(path), config, encoder, labels
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self._encoder_blob: torch.Tensor | None = None  # the encoder pickled, for forkserver readers
        self.trace: str | None = None  # a file: each reader appends when it reached each step to its first item
        self.id_dtype = np.int32 if max(encoder.vocab_sizes, default=0) <= INT32_IDS else np.int64
        # built here, once: reader processes forked from this one share them (else each built them every epoch)
        encoder.prepare_lookups()
        dataset = open_dataset(self.path, config.data, config)
        check_columns(dataset.schema.names, config, self.path)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict:
        """Pickled for a reader process started by a forkserver (:func:`stream_items`): the encoder (its
        vocabularies and lookups, ~14 MB and ~80 ms to pickle for W2) is pickled once per stream into shared
        memory, and each reader unpickles it from there."""
        state = self.__dict__.copy()
        if state.get("_encoder_blob") is None:
            data = pickle.dumps(self.encoder, protocol=pickle.HIGHEST_PROTOCOL)
            state["_encoder_blob"] = self._encoder_blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            self._encoder_blob.share_memory_()
        state["encoder"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        arrived = time.perf_counter()
        if state["encoder"] is None:
            state["encoder"] = pickle.loads(state["_encoder_blob"].numpy().data)
        self.__dict__.update(state)
        self._trace_times = {"unpickling": arrived, "unpickled": time.perf_counter()}

    def pieces(self) -> list[ds.Fragment]:
        dataset = open_dataset(self.path, self.config.data, self.config)
        pieces = []
        for fragment in dataset.get_fragments():
            if isinstance(fragment, ds.ParquetFileFragment):
                pieces.extend(fragment.split_by_row_group())
            else:
                pieces.append(fragment)
        return pieces

    def count_rows(self) -> int:
        return open_dataset(self.path, self.config.data, self.config).count_rows()

    def __iter__(self) -> Iterator[TensorData]:
        for item in self.groups(max(1, GROUP_ROWS // self.batch_size)):
            yield from item.batches()

    def groups(
        self, group: int, recycle: bool = False, session: int | None = None, epoch: int | None = None
    ) -> Iterator[Group]:
        """This worker's batches (every worker's, in one process), ``group`` per :class:`Group`; ``recycle``:
        the consumer copies each item and releases it (:class:`GroupWriter`); ``session``: names this reading
        of the stream in the keys of the pooled buffers (:func:`stream_items`); ``epoch``: the epoch to read
        (default: :attr:`epoch`)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            use_reader_memory_pool()
        epoch = self.epoch if epoch is None else epoch
        pieces = self.pieces()
        order = np.random.default_rng([self.seed, epoch]).permutation(len(pieces))
        seed = self.seed * 7919 + epoch * 31 + worker
        data = self.config.data
        buffer = ShuffleBuffer(data.shuffle_buffer, seed, start=round(data.shuffle_start * data.shuffle_buffer))
        key = (session, worker) if session is not None else None
        writer = GroupWriter(self.batch_size, group, shared=info is not None, recycle=recycle, key=key)
        columns = self.config.input_columns()
        read = {"columns": columns, "batch_size": self.config.data.read_batch_rows, "use_threads": info is None}
        trace = ReaderTrace(self.trace, worker, epoch, getattr(self, "_trace_times", {})) if self.trace else None
        for index in order[worker::workers]:  # a reader process decodes with one thread: readers scale with cores
            piece = pieces[index]
            source = getattr(piece, "path", self.path)
            for record_batch in piece.to_batches(**read):
                if record_batch.num_rows == 0:
                    continue
                if trace:
                    trace("read")
                rows = buffer.reserve(record_batch.num_rows, self.columns)  # encoded in place, no copy
                self._encode_into(record_batch, source, rows)
                emitted = buffer.commit(record_batch.num_rows, self.batch_size)
                if trace:
                    trace("encoded")
                for item in writer.write(buffer.storage, emitted):
                    if trace:
                        trace.item()
                    yield item
        emitted = buffer.drain()
        for item in itertools.chain(writer.write(buffer.storage, emitted), writer.close()):
            if trace:  # (a share smaller than the buffer's start: its first item comes at the end)
                trace.item()
            yield item

    @property
    def columns(self) -> list[tuple[tuple, np.dtype]]:
        """Row shape and dtype of each array of a row: dense, sparse ids, labels (and weights)."""
        columns = [((self.encoder.num_dense,), np.dtype(np.float32))]
        columns += [((len(self.encoder.categorical_names),), np.dtype(self.id_dtype))]
        columns += [((len(self.config.tasks),), np.dtype(np.float32))]
        return columns + ([((), np.dtype(np.float32))] if self.config.data.weight_column else [])

    def _encode_into(self, record_batch, source: str, rows: list[np.ndarray]) -> None:
        """Encode ``record_batch`` into ``rows`` (views of the shuffle buffer: :attr:`columns`)."""
        dense, sparse = self.encoder.transform(record_batch, source, out=(rows[0], rows[1]))
        self.encoder.check_finite(dense, record_batch, source)
        labels = encode_labels(record_batch, self.config.tasks, source)
        rows[2][:] = self.labels.transform(labels) if self.labels is not None and self.labels.active else labels
        if len(rows) > 3:
            rows[3][:] = encode_weights(record_batch, self.config.data.weight_column, source)


def use_reader_memory_pool() -> None:
    """Arrow's jemalloc pool for this process (a reader's; module docstring, 4.), when pyarrow has one."""
    with contextlib.suppress(NotImplementedError):  # a pyarrow built without jemalloc keeps its default pool
        pa.set_memory_pool(pa.jemalloc_memory_pool())


class GroupedStream(IterableDataset):
    """``stream``'s batches of epoch ``epoch`` (default: the stream's epoch now, fixed here: a later
    :meth:`EncodedStream.set_epoch` does not change what this reads), ``group`` at a time, as :class:`Group`
    items (what a reader process sends); ``recycle``: see :meth:`EncodedStream.groups`."""

    def __init__(
        self,
        stream: EncodedStream,
        group: int,
        recycle: bool = False,
        session: int | None = None,
        epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.stream, self.group, self.recycle, self.session = stream, max(1, group), recycle, session
        self.epoch = stream.epoch if epoch is None else epoch

    def __iter__(self) -> Iterator[Group]:
        items = self.stream.groups(self.group, self.recycle, self.session, self.epoch)
        if get_worker_info() is None:
            return items
        # a reader process: its first item is read now, as the process starts (the DataLoader makes this iterator
        # when it starts the reader), not at the first request, which comes once every reader has been started
        # (~30 ms each from a forkserver): the readers fill their shuffle buffers while the others are started
        first = next(items, None)
        return items if first is None else itertools.chain([first], items)

    @staticmethod
    def pack(batches: list[TensorData]) -> Group:
        """Batches -> one item (their arrays concatenated)."""
        whole = TensorData.concat(batches) if len(batches) > 1 else batches[0]
        sizes = np.array([len(b) for b in batches], dtype=np.int64)
        return Group(whole.dense, whole.sparse, whole.labels, whole.weights, sizes)

    @staticmethod
    def unpack(item: Group) -> Iterator[TensorData]:
        return item.batches()


_SESSIONS = itertools.count()


def reader_context(start_method: str | None = None) -> multiprocessing.context.BaseContext:
    """How reader processes start: ``start_method``, else ``fork`` (a copy of this process: nothing to pickle),
    except once this process has initialised CUDA: then ``forkserver``. A reader forked from a process with a
    CUDA context inherits that context's objects in a state CUDA refuses (each reader printed "CUDA warning:
    initialization error" at exit, from a CUDA graph it had inherited); one started by the forkserver (a clean
    process that has imported only this module) inherits none. That costs, per reader and epoch, unpickling the
    stream (the encoder from shared memory: :meth:`EncodedStream.__getstate__`) while the first rows are read,
    and nothing per batch."""
    if start_method is None:
        start_method = "forkserver" if torch.cuda.is_initialized() else "fork"
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(["mtrank.data.streaming"])  # before the server's first start
    return multiprocessing.get_context(start_method)


def start_forkserver() -> None:
    """Start the forkserver that reader processes come from once CUDA is initialised (:func:`reader_context`)
    now, in the background: the server is a fresh Python that imports torch and this module (seconds), which its
    first reader would otherwise wait for."""
    import multiprocessing.forkserver

    reader_context("forkserver")  # its preload, before the server starts
    multiprocessing.forkserver.ensure_running()


def _as_is(item: Group) -> Group:
    return item  # the DataLoader's default would turn the numpy sizes into a tensor, which moves with the item


class EpochReaders:
    """One epoch of ``stream`` read by ``workers`` reader processes (a DataLoader; 0 = read in this process),
    **started when this is made**: the readers start and fill their shuffle buffers while the consumer does
    something else (e.g. trains on the previous epoch: :class:`~mtrank.train.sources.StreamSource`).

    Iterate once for the items (:class:`Group`); the readers stop at the end, or at :meth:`close` (whether or
    not the items were read), or when this object is freed. The readers read epoch ``epoch`` (default: the
    stream's epoch now), fixed here: a later :meth:`EncodedStream.set_epoch` changes nothing they read.
    The other arguments are :func:`stream_items`'s. A :class:`DataError` raised in a reader process arrives
    wrapped in that process's traceback; it is raised again here with its own one-line message.
    """

    def __init__(
        self,
        stream: EncodedStream,
        workers: int,
        pin_memory: bool = False,
        group: int | None = None,
        recycle: bool | None = None,
        start_method: str | None = None,
        epoch: int | None = None,
    ) -> None:
        if group is None:
            group = GROUP_ROWS // stream.batch_size
        # the workers' base seed from a generator of the loader's own: the DataLoader would draw it from torch's
        # global generator, so a run resumed mid-epoch (one more iterator) would draw other dropout / rounding noise
        loader_seeds = torch.Generator().manual_seed(0)
        kwargs = {"num_workers": workers, "batch_size": None, "pin_memory": pin_memory, "generator": loader_seeds}
        kwargs["collate_fn"] = _as_is
        if workers > 0:
            kwargs.update(prefetch_factor=PREFETCH_FACTOR, persistent_workers=False)
            kwargs["multiprocessing_context"] = reader_context(start_method)
        self.workers, self.session = workers, next(_SESSIONS)
        recycle = pin_memory if recycle is None else recycle  # pinned items are copied (and released) on arrival
        dataset = GroupedStream(stream, group, recycle=recycle, session=self.session, epoch=epoch)
        self.epoch = dataset.epoch
        self.iterator = iter(DataLoader(dataset, **kwargs))  # with workers: they start now
        # when they were all started (processes created: with a forkserver, after the server's own start)
        self.started = time.perf_counter()
        self._close = weakref.finalize(self, _end_reading, self.iterator, self.session)

    def __iter__(self) -> Iterator[Group]:
        try:
            yield from self.iterator
        except DataError as err:
            raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the readers (a reader busy on an item stops after it) and unmap the buffers they pooled here."""
        self._close()

    @property
    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """The reader processes (none with 0 workers)."""
        return list(getattr(self.iterator, "_workers", []))


def _end_reading(iterator: Iterator[Group], session: int) -> None:
    # the DataLoader's own shutdown (what its iterator does when freed), which it does not make public:
    # readers told to stop, joined (terminated if they do not stop), its queues and pin thread closed
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    _forget_segments(session)


def stream_items(
    stream: EncodedStream,
    workers: int,
    pin_memory: bool = False,
    group: int | None = None,
    recycle: bool | None = None,
    start_method: str | None = None,
) -> Iterator[Group]:
    """The items of ``stream`` (:class:`Group`), read by ``workers`` reader processes (a DataLoader; 0 = read in
    this process), started at the first item (:class:`EpochReaders` starts them when made).

    ``group`` batches travel between processes as one item (default ``GROUP_ROWS // batch_size``; 1 = one
    batch per item); ``pin_memory`` puts them in page-locked memory (for an asynchronous copy to a GPU).
    ``recycle`` (default: ``pin_memory``): readers may rewrite an item's buffer once it is released
    (:meth:`Group.release`; the pin copy does it), so a consumer that keeps views of an item must not release it.
    ``start_method``: how reader processes start (:func:`reader_context`).
    A :class:`DataError` raised in a reader process arrives wrapped in that process's traceback; it is raised
    again here with its own one-line message."""
    yield from EpochReaders(stream, workers, pin_memory, group, recycle, start_method)


def skip_batches(items: Iterable[Group], skip: int) -> Iterator[Group]:
    """``items`` from batch ``skip`` on: whole items before it are dropped, the one it falls in is cut (views)."""
    for item in items:
        if skip >= len(item.sizes):
            skip -= len(item.sizes)
            item.finished()
            continue
        yield item.drop(skip) if skip else item
        skip = 0


def stream_loader(
    stream: EncodedStream, workers: int, pin_memory: bool = False, group: int | None = None
) -> Iterator[TensorData]:
    """The batches of ``stream``, read by ``workers`` reader processes (:func:`stream_items`, split)."""
    for item in stream_items(stream, workers, pin_memory, group):
        yield from item.batches()
