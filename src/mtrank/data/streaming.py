"""Streaming: encoded training batches from files larger than memory; shuffle buffer, reader processes.

The training files are opened as one ``pyarrow.dataset`` (:func:`mtrank.data.readers.open_dataset`) and split
into pieces: Parquet row groups, or whole CSV files. Each epoch the pieces are shuffled (seed + epoch) and
dealt to the reader processes (``torch.utils.data.DataLoader`` workers), piece ``i`` to worker ``i mod W``.
A worker reads its pieces as record batches of ``read_batch_rows``, encodes them with the fitted
:class:`~mtrank.data.encoders.FeatureEncoder` (vectorised), and pushes the rows into a shuffle buffer:

    when the buffer holds ``>= capacity`` rows: permute it, emit batches until ``capacity / 2`` rows are left,
    keep those (they mix with the next rows read); at the end, permute and emit what is left.

Memory per worker is bounded by ``capacity + read_batch_rows`` encoded rows plus one record batch, whatever
the size of the files; the DataLoader keeps ``prefetch_factor`` items per worker in flight.

Between processes (:func:`stream_loader`), a reader sends ``group`` consecutive batches as one item: each of
its arrays concatenated, with the batch sizes (one shared-memory segment per array per group, not per
batch: moving a tensor between processes costs a file descriptor and a mapping, whatever its size). The
trainer's process splits the item back into batches (views, no copy). With ``pin_memory`` the DataLoader's
pin thread copies each item into page-locked memory, so the copy to the GPU can be asynchronous
(:class:`~mtrank.train.prefetch.Prefetcher`). Items arrive worker by worker in turn, so the batch order
depends on the number of workers and on ``group`` (fixed for a given seed, epoch, workers and group).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as ds
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtrank.config.experiment import ExperimentConfig
from mtrank.data.encoders import FeatureEncoder, LabelTransforms
from mtrank.data.errors import DataError
from mtrank.data.readers import check_columns, encode_labels, encode_weights, open_dataset
from mtrank.data.tensors import TensorData


@dataclass
class Batch:
    """A training batch as numpy arrays (``dense [B, F_dense]``, ``sparse [B, F_cat]``, ``labels [B, K]``)."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None


class ShuffleBuffer:
    """Rows in, shuffled batches out, holding at most ``capacity + one input chunk`` rows.

    Example:
        >>> buf = ShuffleBuffer(capacity=4, seed=0)
        >>> out = [b for chunk in np.arange(10).reshape(5, 2) for b in buf.push([chunk], batch_size=2)]
        >>> out += list(buf.flush(batch_size=2))
        >>> sorted(int(v) for b in out for v in b[0])
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = max(1, capacity)
        self.rng = np.random.default_rng(seed)
        self.parts: list[list[np.ndarray]] = []
        self.rows = 0

    def push(self, arrays: list[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
        self.parts.append(arrays)
        self.rows += len(arrays[0])
        if self.rows >= self.capacity:
            yield from self._emit(batch_size, keep=self.capacity // 2)

    def flush(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        yield from self._emit(batch_size, keep=0)

    def _emit(self, batch_size: int, keep: int) -> Iterator[list[np.ndarray]]:
        if not self.parts:
            return
        columns = [np.concatenate(col) for col in zip(*self.parts)]
        order = self.rng.permutation(self.rows)
        emit = self.rows - keep
        emit = emit - emit % batch_size if keep else emit  # full batches while streaming; the rest at the end
        for start in range(0, emit, batch_size):
            idx = order[start : min(start + batch_size, emit)]
            yield [c[idx] for c in columns]
        rest = order[emit:]
        self.parts = [[c[rest] for c in columns]] if rest.size else []
        self.rows = int(rest.size)


class EncodedStream(IterableDataset):
    """Batches of encoded rows streamed from the training files (see the module docstring).

    Yields :class:`mtrank.data.tensors.TensorData` batches of ``batch_size`` rows (the last one of an epoch
    may be smaller), labels on the model's scale when ``labels`` transforms them. Call :meth:`set_epoch` before
    each epoch to reshuffle.
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
        dataset = open_dataset(self.path, config.data, config)
        check_columns(dataset.schema.names, config, self.path)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pieces = self.pieces()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(pieces))
        buffer = ShuffleBuffer(self.config.data.shuffle_buffer, seed=self.seed * 7919 + self.epoch * 31 + worker)
        columns = self.config.input_columns()
        read = {"columns": columns, "batch_size": self.config.data.read_batch_rows, "use_threads": info is None}
        for index in order[worker::workers]:  # a reader process decodes with one thread: readers scale with cores
            piece = pieces[index]
            source = getattr(piece, "path", self.path)
            for record_batch in piece.to_batches(**read):
                if record_batch.num_rows == 0:
                    continue
                arrays = self._encode(record_batch, source)
                for out in buffer.push(arrays, self.batch_size):
                    yield self._tensors(out)
        for out in buffer.flush(self.batch_size):
            yield self._tensors(out)

    def _encode(self, record_batch, source: str) -> list[np.ndarray]:
        dense, sparse = self.encoder.transform(record_batch, source)
        self.encoder.check_finite(dense, record_batch, source)
        labels = encode_labels(record_batch, self.config.tasks, source)
        if self.labels is not None and self.labels.active:  # on the scale the model learns
            labels = self.labels.transform(labels)
        arrays = [dense, sparse, labels]
        weights = encode_weights(record_batch, self.config.data.weight_column, source)
        if weights is not None:
            arrays.append(weights)
        return arrays

    @staticmethod
    def _tensors(arrays: list[np.ndarray]) -> TensorData:
        weights = torch.from_numpy(arrays[3]) if len(arrays) > 3 else None
        return TensorData(
            torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]), torch.from_numpy(arrays[2]), weights
        )


GROUP_ROWS = 65_536  # rows a reader sends as one item by default (``group = GROUP_ROWS // batch_size``, >= 1)


class GroupedStream(IterableDataset):
    """``stream``'s batches, ``group`` at a time, as one item: ``(dense, sparse, labels, weights | None, sizes)``
    with the arrays of the batches concatenated (what a reader process sends; see the module docstring)."""

    def __init__(self, stream: EncodedStream, group: int) -> None:
        super().__init__()
        self.stream, self.group = stream, max(1, group)

    def __iter__(self) -> Iterator[tuple]:
        pending: list[TensorData] = []
        for batch in self.stream:
            pending.append(batch)
            if len(pending) == self.group:
                yield self.pack(pending)
                pending = []
        if pending:
            yield self.pack(pending)

    @staticmethod
    def pack(batches: list[TensorData]) -> tuple:
        whole = TensorData.concat(batches) if len(batches) > 1 else batches[0]
        sizes = torch.tensor([len(b) for b in batches], dtype=torch.int64)
        return whole.dense, whole.sparse, whole.labels, whole.weights, sizes

    @staticmethod
    def unpack(item: tuple) -> Iterator[TensorData]:
        dense, sparse, labels, weights, sizes = item
        start = 0
        for size in sizes.tolist():
            rows = slice(start, start + size)
            yield TensorData(dense[rows], sparse[rows], labels[rows], None if weights is None else weights[rows])
            start += size


def stream_loader(
    stream: EncodedStream, workers: int, pin_memory: bool = False, group: int | None = None
) -> Iterator[TensorData]:
    """The batches of ``stream``, read by ``workers`` reader processes (a DataLoader; 0 = read in this process).

    ``group`` batches travel between processes as one item (default ``GROUP_ROWS // batch_size``; 1 = one
    batch per item); ``pin_memory`` puts them in page-locked memory (for an asynchronous copy to a GPU).
    A :class:`DataError` raised in a reader process arrives wrapped in that process's traceback; it is raised
    again here with its own one-line message."""
    if group is None:
        group = GROUP_ROWS // stream.batch_size
    # the workers' base seed from a generator of the loader's own: the DataLoader would draw it from torch's global
    # generator, so a run resumed mid-epoch (one more iterator) would draw other dropout / rounding noise
    loader_seeds = torch.Generator().manual_seed(0)
    kwargs = {"num_workers": workers, "batch_size": None, "pin_memory": pin_memory, "generator": loader_seeds}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    try:
        for item in DataLoader(GroupedStream(stream, group), **kwargs):
            yield from GroupedStream.unpack(item)
    except DataError as err:
        raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
