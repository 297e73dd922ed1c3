"""Streaming: encoded training batches from files larger than memory; shuffle buffer, reader processes.

The training files are opened as one ``pyarrow.dataset`` (:func:`mtrank.data.readers.open_dataset`) and split
into pieces: Parquet row groups, or whole CSV files. Each epoch the pieces are shuffled (seed + epoch) and
dealt to the reader processes (``torch.utils.data.DataLoader`` workers), piece ``i`` to worker ``i mod W``.
A worker reads its pieces as record batches of ``read_batch_rows``, encodes them with the fitted
:class:`~mtrank.data.encoders.FeatureEncoder` (vectorised), and pushes the rows into a shuffle buffer:

    when the buffer holds ``>= capacity`` rows: permute it, emit batches until ``capacity / 2`` rows are left,
    keep those (they mix with the next rows read); at the end, permute and emit what is left.

Memory per worker is bounded by ``capacity + read_batch_rows`` encoded rows plus one record batch, whatever
the size of the files; the DataLoader keeps ``prefetch_factor`` batches per worker in flight.
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
        for index in order[worker::workers]:
            piece = pieces[index]
            source = getattr(piece, "path", self.path)
            for record_batch in piece.to_batches(columns=columns, batch_size=self.config.data.read_batch_rows):
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


def stream_loader(stream: EncodedStream, workers: int) -> Iterator[TensorData]:
    """The batches of ``stream``, read by ``workers`` reader processes (a DataLoader; 0 = read in this process).

    A :class:`DataError` raised in a reader process arrives wrapped in that process's traceback; it is raised
    again here with its own one-line message."""
    kwargs = {"num_workers": workers, "batch_size": None}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    try:
        yield from DataLoader(stream, **kwargs)
    except DataError as err:
        raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
