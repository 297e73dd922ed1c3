"""The prefetcher and the streaming source that uses it: on CPU, the same batches in the same order as without
it; readers' grouped items split back into the batches they packed; a mid-epoch skip drops exactly the batches
trained on."""

import warnings

import numpy as np
import pytest
import torch

from mtrank.data import make_synthetic
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.streaming import EncodedStream, GroupedStream, stream_loader
from mtrank.data.tensors import TensorData
from mtrank.train.prefetch import Prefetcher, map_tensors
from mtrank.train.sources import InMemorySource, StreamSource
from tabular_helpers import one_torch_thread  # noqa: F401
from test_tabular_streaming import shards, stream_config  # noqa: F401

CPU = torch.device("cpu")


def assert_same_batches(got: list[TensorData], expected: list[TensorData]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for name in ("dense", "sparse", "labels", "weights"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert torch.equal(x, y), name


def test_prefetcher_on_cpu_yields_the_in_memory_sources_batches_in_order():
    source = InMemorySource(make_synthetic(n=50, seed=1), batch_size=8, seeds=3, device=CPU)
    expected = [source.batch(k) for k in source.keys(epoch=2)]
    prefetcher = Prefetcher(iter(expected), CPU, depth=3)
    got = list(prefetcher)
    assert_same_batches(got, expected)
    assert prefetcher.copies == len(expected) == 7
    assert len(got[-1]) == 2  # the short last batch too


def test_prefetcher_rejects_a_depth_below_one_and_a_batch_without_tensors():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(iter([]), CPU, depth=0)
    with pytest.raises(TypeError, match="cannot prefetch a dict"):
        map_tensors({"x": torch.zeros(1)}, lambda t: t)


def test_grouped_items_unpack_into_the_batches_they_packed():
    data = make_synthetic(n=20, seed=0)
    data.weights = torch.rand(20)
    batches = [data[slice(0, 8)], data[slice(8, 16)], data[slice(16, 20)]]
    item = GroupedStream.pack(batches)
    assert item[4].tolist() == [8, 8, 4]
    assert_same_batches(list(GroupedStream.unpack(item)), batches)


def stream_of(shards, batch_size=16):  # noqa: F811
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    return EncodedStream(str(train), cfg, encoder, batch_size=batch_size, seed=4)


def test_in_one_process_grouping_keeps_the_batch_order(shards):  # noqa: F811
    stream = stream_of(shards)
    one = list(stream_loader(stream, 0, group=1))
    assert len(one) == 15  # 240 rows in batches of 16
    for group in (2, 4, 100):
        assert_same_batches(list(stream_loader(stream, 0, group=group)), one)


@pytest.mark.parametrize("workers,group", [(0, 3), (2, 1), (2, 3)])
def test_stream_source_yields_the_loaders_batches_from_the_skipped_one_on(shards, workers, group):  # noqa: F811
    stream = stream_of(shards)
    source = StreamSource(stream, workers, CPU, group=group)
    assert source.rows == 240 and source.steps_per_epoch == 15
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        everything = list(stream_loader(stream, workers, group=group))
        assert_same_batches(list(source.keys(epoch)), everything)
        assert_same_batches(list(source.keys(epoch, skip=6)), everything[6:])
        assert_same_batches(list(source.keys(epoch, skip=7)), everything[7:])  # inside an item too
    rows = np.sort(np.concatenate([b.labels[:, 1].numpy() for b in everything]))
    np.testing.assert_array_equal(rows, np.sort(shards[2].ts.iloc[:240].to_numpy()).astype(np.float32))


def test_resuming_with_another_reader_grouping_warns_that_the_order_changes(shards):  # noqa: F811
    source = StreamSource(stream_of(shards), 0, CPU, group=2)
    assert source.position() == {"workers": 0, "group": 2}
    with pytest.warns(UserWarning, match="2 batches per reader item; the checkpoint was written with 5"):
        source.check_position({"workers": 0, "group": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source.check_position({"workers": 0})  # a checkpoint from before groups: nothing to say


def test_a_prefetched_item_moves_its_tensors_and_keeps_its_batch_sizes_on_the_host():
    data = make_synthetic(n=12, seed=2)
    item = GroupedStream.pack([data[slice(0, 8)], data[slice(8, 12)]])
    moved = map_tensors(item, lambda t: t.clone())
    assert type(moved) is type(item) and moved.sizes is item.sizes and moved.weights is None
    assert moved.dense is not item.dense and torch.equal(moved.dense, item.dense)
    assert_same_batches(list(GroupedStream.unpack(moved)), [data[slice(0, 8)], data[slice(8, 12)]])
