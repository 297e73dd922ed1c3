import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mtrank
from mtrank.config.experiment import experiment_from_dict
from mtrank.data import streaming
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.streaming import EncodedStream, ShuffleBuffer, stream_items, stream_loader
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


def write_shards(folder, frame, shards=3, row_group=40):
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(frame)), shards)):
        table = pa.Table.from_pandas(frame.iloc[part], preserve_index=False)
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=row_group)
    return folder


def stream_config(train, valid, **train_section):
    tasks = [
        {"name": "click"},
        {"name": "ts", "type": "regression"},
    ]  # ts: a unique id per row, passed through
    return experiment_from_dict(
        config(
            data={
                "train": str(train),
                "valid": str(valid),
                "split": {"method": "files"},
                "streaming": True,
                "shuffle_buffer": 64,
                "read_batch_rows": 25,
                "workers": 0,
            },
            tasks=tasks,
            train={"progress": False, **train_section},
        )
    )


@pytest.fixture
def shards(tmp_path):
    frame = make_frame(n=300)
    train = write_shards(tmp_path / "train", frame.iloc[:240])
    frame.iloc[240:].to_csv(tmp_path / "valid.csv", index=False)
    return train, tmp_path / "valid.csv", frame


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_streams_every_row_exactly_once(shards, workers):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    stream = EncodedStream(str(train), cfg, encoder, batch_size=32, seed=0)
    seen = [b.labels[:, 1] for b in stream_loader(stream, workers)]
    ids = np.sort(np.concatenate([s.numpy() for s in seen]))
    np.testing.assert_array_equal(ids, np.sort(frame.ts.iloc[:240].to_numpy()).astype(np.float32))
    assert all(len(s) <= 32 for s in seen)


def test_streamed_rows_encode_exactly_like_the_in_memory_path(shards):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    batches = list(stream_loader(EncodedStream(str(train), cfg, encoder, batch_size=50), 0))
    ts = np.concatenate([b.labels[:, 1].numpy() for b in batches]).astype(int)
    dense = np.concatenate([b.dense.numpy() for b in batches])
    expected, _ = encoder.transform(frame.set_index("ts").loc[ts].reset_index())
    np.testing.assert_allclose(dense, expected, rtol=1e-6)


def test_each_epoch_reshuffles_the_rows(shards):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame), batch_size=240)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append(np.concatenate([b.labels[:, 1].numpy() for b in stream_loader(stream, 0)]))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(np.sort(orders[0]), np.sort(orders[1]))


def test_shuffle_buffer_holds_at_most_capacity_plus_one_chunk():
    buffer = ShuffleBuffer(capacity=100, seed=0)
    out, peak = [], 0
    for chunk in np.arange(1000).reshape(40, 25):
        out += list(buffer.push([chunk], batch_size=16))
        peak = max(peak, buffer.rows)
    out += list(buffer.flush(batch_size=16))
    assert peak < 100 + 25
    values = np.concatenate([b[0] for b in out])
    np.testing.assert_array_equal(np.sort(values), np.arange(1000))
    assert not np.array_equal(values, np.arange(1000))  # shuffled
    assert all(len(b[0]) == 16 for b in out[:-1])


def test_shuffle_buffer_emits_its_first_rows_at_start_then_at_capacity():
    """data.shuffle_start: once ``start`` rows are in, half of each chunk goes out (whole batches) until the
    buffer has held ``capacity`` rows; then as without an early start (at capacity, down to half); every row
    once; start = capacity is the buffer without an early start."""
    chunks = np.arange(600).reshape(12, 50)
    early, full = ShuffleBuffer(capacity=200, seed=0, start=100), ShuffleBuffer(capacity=200, seed=0)
    out_early = [len(early.add([c], batch_size=10)) for c in chunks]
    out_full = [len(full.add([c], batch_size=10)) for c in chunks]
    # 100 in: 25 of the last chunk's 50, as 2 batches (keeps 80); 130 (keeps 110); 160 (140); 190 (170); 220: full
    assert out_early[:7] == [0, 20, 20, 20, 20, 120, 0]
    assert out_full[:7] == [0, 0, 0, 100, 0, 100, 0]
    assert sum(out_early) + len(early.drain()) == sum(out_full) + len(full.drain()) == 600
    assert ShuffleBuffer(capacity=200, seed=0, start=10**6).start == 200


def test_streaming_fit_trains_and_writes_a_model_directory(shards, tmp_path):
    train, valid, _ = shards
    cfg = stream_config(train, valid, epochs=4, batch_size=32, lr=0.01)
    cfg.tasks = cfg.tasks[:1]
    result = mtrank.fit(cfg, output=tmp_path / "model")
    assert result.rows["train"] == 240 and result.train_result.steps == 4 * 8
    assert result.metrics["valid"]["auc/click"] > 0.6
    assert (tmp_path / "model" / "encoders.json").is_file()


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_streaming_run_resumes_mid_epoch_and_ends_like_an_uninterrupted_one(shards, tmp_path, workers):
    train, valid, _ = shards
    common = dict(batch_size=32, lr=0.01, eval_every=4)  # 8 batches per epoch

    def run(steps, ckpt=None, out="m"):
        cfg = stream_config(train, valid, steps=steps, **common, **({"checkpoint_dir": str(ckpt)} if ckpt else {}))
        cfg.data.workers = workers
        return mtrank.fit(cfg, output=tmp_path / out)

    full = run(20, out="full")
    part = run(11, tmp_path / "ckpt", out="part")  # stops in epoch 1, after its 3rd batch
    assert part.train_result.steps == 11
    resumed = run(20, tmp_path / "ckpt", out="resumed")
    assert resumed.train_result.resumed_from == 11
    # only the rows not trained on before the interruption
    assert resumed.train_result.samples == full.train_result.samples - part.train_result.samples
    assert [h["step"] for h in resumed.train_result.history] == [4, 8, 11, 12, 16, 20]
    full_losses = {h["step"]: h["valid/loss"] for h in full.train_result.history}
    for h in resumed.train_result.history:
        if h["step"] in full_losses:
            assert h["valid/loss"] == pytest.approx(full_losses[h["step"]], rel=1e-5)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_streaming_takes_its_validation_rows_from_the_test_file_when_asked(shards, tmp_path):
    """split.valid_from: test with streaming: half the test file validates (best-step selection), half tests."""
    train, valid_csv, _ = shards
    cfg = stream_config(train, valid_csv, epochs=3, batch_size=32, lr=0.01)
    cfg.data.valid, cfg.data.test = "", str(valid_csv)
    cfg.data.split.valid_from, cfg.data.split.valid_fraction = "test", 0.5
    result = mtrank.fit(cfg, output=None)
    assert result.rows == {"train": 240, "valid": 30, "test": 30}
    assert result.train_result.best_step > 0
    assert all("valid/loss" in h for h in result.train_result.history)


class ReferenceShuffleBuffer:
    """The shuffle buffer as first written (concatenate, permute, index each batch): the rule the fast one keeps."""

    def __init__(self, capacity, seed, start=None):
        self.capacity, self.rng, self.parts, self.rows = max(1, capacity), np.random.default_rng(seed), [], 0
        self.start, self.filled = (self.capacity if start is None else start), False

    def push(self, arrays, batch_size):
        self.parts.append(arrays)
        self.rows += len(arrays[0])
        self.filled = self.filled or self.rows >= self.capacity
        if self.filled and self.rows >= self.capacity:
            yield from self.emit(batch_size, keep=self.capacity // 2)
        elif not self.filled and self.rows >= self.start:  # growing: half of each chunk out
            yield from self.emit(batch_size, keep=self.rows - len(arrays[0]) // 2)

    def emit(self, batch_size, keep):
        if not self.parts:
            return
        columns = [np.concatenate(col) for col in zip(*self.parts)]
        order = self.rng.permutation(self.rows)
        emit = self.rows - keep
        emit = emit - emit % batch_size if keep else emit
        for start in range(0, emit, batch_size):
            yield [c[order[start : min(start + batch_size, emit)]] for c in columns]
        rest = order[emit:]
        self.parts = [[c[rest] for c in columns]] if rest.size else []
        self.rows = int(rest.size)


@pytest.mark.parametrize(
    "capacity,batch_size,start", [(100, 16, None), (64, 240, None), (7, 1, None), (1000, 32, None), (100, 16, 50)]
)
def test_shuffle_buffer_emits_the_reference_buffers_batches_in_the_same_order(capacity, batch_size, start):
    rng = np.random.default_rng(capacity)
    sizes = rng.integers(1, 60, size=40)  # uneven chunks, some larger than a batch, some smaller
    chunks = [[rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 9, size=(n, 2))] for n in sizes]
    fast = ShuffleBuffer(capacity, seed=5, start=start)
    reference = ReferenceShuffleBuffer(capacity, seed=5, start=start)
    got = [b for chunk in chunks for b in fast.push(chunk, batch_size)] + list(fast.flush(batch_size))
    expected = [b for chunk in chunks for b in reference.push(chunk, batch_size)]
    expected += list(reference.emit(batch_size, keep=0))
    assert len(got) == len(expected) > 1
    for a, b in zip(got, expected):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert fast.rows == 0


def test_ids_travel_as_int32_and_arrive_as_the_encoders_int64_ids(shards, monkeypatch):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    narrow = EncodedStream(str(train), cfg, encoder, batch_size=50)
    monkeypatch.setattr(streaming, "INT32_IDS", max(encoder.vocab_sizes) - 1)  # one vocabulary too large
    wide = EncodedStream(str(train), cfg, encoder, batch_size=50)
    assert narrow.id_dtype == np.int32 and wide.id_dtype == np.int64
    for stream in (narrow, wide):
        item = next(iter(stream.groups(2)))
        assert item.sparse.dtype == torch.from_numpy(np.empty(0, stream.id_dtype)).dtype
        batches = list(stream_loader(stream, 0))
        assert all(b.sparse.dtype == torch.int64 for b in batches)
        ts = np.concatenate([b.labels[:, 1].numpy() for b in batches]).astype(int)
        sparse = np.concatenate([b.sparse.numpy() for b in batches])
        _, expected = encoder.transform(frame.set_index("ts").loc[ts].reset_index())
        np.testing.assert_array_equal(sparse, expected)


def test_a_reader_process_sends_each_item_as_one_shared_memory_segment(shards):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame.iloc[:240]), batch_size=16)
    items = list(stream_items(stream, 1, group=4))
    assert [len(i.sizes) for i in items] == [4, 4, 4, 3] and items[-1].sizes.tolist() == [16, 16, 16]
    for item in items:
        tensors = [item.dense, item.sparse, item.labels]
        assert all(t.is_shared() for t in tensors)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one segment, three views
    batches = [b for item in items for b in item.batches()]
    ids = np.sort(np.concatenate([b.labels[:, 1].numpy() for b in batches]))
    np.testing.assert_array_equal(ids, np.sort(frame.ts.iloc[:240].to_numpy()).astype(np.float32))


def test_a_writer_rewrites_only_the_buffers_whose_lease_was_released():
    storage = [np.arange(60, dtype=np.float32).reshape(20, 3), np.arange(20, dtype=np.int32), np.zeros((20, 1))]
    writer = streaming.GroupWriter(batch_size=2, group=2, shared=False, recycle=True)
    first, second = list(writer.write(storage, np.arange(8)))
    assert first.lease.item() == 1 and second.lease.item() == 1
    first.release()
    (third,) = writer.write(storage, np.arange(8, 12))
    assert third.dense.data_ptr() == first.dense.data_ptr()  # the released buffer, rewritten
    np.testing.assert_array_equal(second.sparse.numpy(), [4, 5, 6, 7])  # the held one, untouched
    np.testing.assert_array_equal(third.sparse.numpy(), [8, 9, 10, 11])
    unpooled = streaming.GroupWriter(batch_size=2, group=2, shared=False)
    assert all(item.lease is None for item in unpooled.write(storage, np.arange(8)))


@pytest.mark.parametrize("workers", [0, 1])
def test_items_copied_and_released_on_arrival_equal_the_unrecycled_ones(shards, workers):
    """What the pin thread does on CUDA (copy each item, then release it), with readers rewriting buffers."""
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame.iloc[:240]), batch_size=8)
    expected = [b for item in stream_items(stream, workers, group=1) for b in item.batches()]
    copies = []
    for item in stream_items(stream, workers, group=1, recycle=True):
        copies.append(streaming.Group(item.dense.clone(), item.sparse.clone(), item.labels.clone(), None, item.sizes))
        item.release()
    got = [b for item in copies for b in item.batches()]
    assert len(got) == len(expected) == 30 > streaming.RECYCLED_ITEMS  # buffers were rewritten
    for a, b in zip(got, expected):
        assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)


def test_a_readers_recycled_buffer_is_sent_and_mapped_once_then_items_travel_as_their_places(shards):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame.iloc[:240]), batch_size=8)
    buffers, mapped = set(), 0
    for item in stream_items(stream, 1, group=1, recycle=True):
        buffers.add(item.dense.untyped_storage().data_ptr())
        mapped = max(mapped, len(streaming.SEGMENTS))
        item.release()
    assert len(buffers) == mapped <= streaming.RECYCLED_ITEMS  # 30 items from at most 8 mappings
    assert streaming.SEGMENTS == {}  # unmapped when the reading ends
    writer = streaming.GroupWriter(batch_size=2, group=1, shared=True, recycle=True, key=(0, 0))
    storage = [np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20, dtype=np.int32), np.zeros((20, 1))]
    first, second = list(writer.write(storage, np.arange(4)))
    first.release()
    (third,) = writer.write(storage, np.arange(4, 6))
    assert [first.segment, second.segment] == [((0, 0, 0), True), ((0, 0, 1), True)]
    assert third.segment == ((0, 0, 0), False)  # the released buffer, rewritten
    buffer_sent = [item.__reduce__()[1][1] is not None for item in (first, second, third)]
    assert buffer_sent == [True, True, False]  # with the first item from each buffer only


class FakeCudart:
    """``torch.cuda.cudart()`` for the page-locking logic on a machine without CUDA: records the calls."""

    def __init__(self, error: int = 0) -> None:
        self.error = error  # what cudaHostRegister returns (0: success)
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802
        self.registered.append(ptr)
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_a_page_locked_buffer_is_registered_once_not_copied_and_released_when_its_copy_is_finished(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    writer = streaming.GroupWriter(batch_size=2, group=1, shared=True, recycle=True, key=(41, 0))
    storage = [np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20, dtype=np.int32), np.zeros((20, 1))]
    sent = list(writer.write(storage, np.arange(4)))
    first, second = (pickle.loads(pickle.dumps(item)) for item in sent)  # as the trainer's process receives them
    pinned = first.pin_memory()
    assert pinned.dense.data_ptr() == first.dense.data_ptr() and pinned.lease is None  # in place, no copy
    assert torch.equal(pinned.sparse, torch.tensor([0, 1], dtype=torch.int32))
    lease = streaming.SEGMENTS[(41, 0, 0)][:4].view(torch.int32)
    assert lease.item() == 1  # still the reader's to keep: the copy to the GPU has not finished
    pinned.finished()
    assert lease.item() == 0
    assert first.pin_memory().dense.data_ptr() == pinned.dense.data_ptr() and len(cudart.registered) == 1  # once
    skipped = list(streaming.skip_batches([second.pin_memory()], 1))
    assert skipped == [] and streaming.SEGMENTS[(41, 0, 1)][:4].view(torch.int32).item() == 0  # skipped: released
    streaming._forget_segments(41)
    assert sorted(cudart.unregistered) == sorted(cudart.registered) and len(cudart.registered) == 2
    assert not streaming.SEGMENTS and not streaming.PAGE_LOCKED


def test_a_buffer_cuda_cannot_page_lock_is_tried_once_and_its_items_are_copied(monkeypatch):
    cudart = FakeCudart(error=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    streaming.SEGMENTS[(43, 0, 0)] = torch.zeros(128, dtype=torch.uint8)
    assert not streaming._page_locked((43, 0, 0)) and not streaming._page_locked((43, 0, 0))
    assert len(cudart.registered) == 1 and not streaming.PAGE_LOCKED
    streaming._forget_segments(43)
    assert not cudart.unregistered and not streaming.SEGMENTS


def test_readers_started_by_a_forkserver_send_the_batches_forked_readers_send(shards):
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame.iloc[:240]), batch_size=8)
    assert streaming.reader_context().get_start_method() == "fork"  # no CUDA context here to keep out
    batches = {}
    for method in ("fork", "forkserver"):
        items = stream_items(stream, 2, group=3, start_method=method)  # not recycled: batches stay as sent
        batches[method] = [b for item in items for b in item.batches()]
    assert len(batches["fork"]) == len(batches["forkserver"]) == 30
    for a, b in zip(batches["fork"], batches["forkserver"]):
        assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_sample_weights_arrive_with_their_rows(tmp_path, workers):
    frame = make_frame(n=120)
    frame["w"] = (frame.ts % 7 + 1).astype(float)
    train = write_shards(tmp_path / "train", frame)
    frame.to_csv(tmp_path / "valid.csv", index=False)
    cfg = stream_config(train, tmp_path / "valid.csv")
    cfg.data.weight_column = "w"
    stream = EncodedStream(str(train), cfg, FeatureEncoder(cfg.features).fit(frame), batch_size=16)
    batches = list(stream_loader(stream, workers, group=3))
    ts = np.concatenate([b.labels[:, 1].numpy() for b in batches]).astype(int)
    weights = np.concatenate([b.weights.numpy() for b in batches])
    np.testing.assert_array_equal(np.sort(ts), np.sort(frame.ts.to_numpy()))
    np.testing.assert_array_equal(weights, frame.set_index("ts").loc[ts, "w"].to_numpy(np.float32))


def test_a_reader_process_reads_its_first_item_when_its_iterator_is_made(shards, tmp_path, monkeypatch):
    """In a reader process the DataLoader makes the dataset's iterator as the process starts, and asks for the
    first item only once every reader is started: the first item is read at the iterator's making (the trace's
    line is written then), and the items are those read in this process."""
    train, valid, frame = shards
    cfg = stream_config(train, valid)
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    stream = EncodedStream(str(train), cfg, encoder, batch_size=32, seed=0)
    expected = [b.labels.numpy() for item in streaming.GroupedStream(stream, group=2) for b in item.batches()]
    stream.trace = str(tmp_path / "trace.jsonl")
    monkeypatch.setattr(streaming, "get_worker_info", lambda: type("Info", (), {"id": 0, "num_workers": 1})())
    monkeypatch.setattr(streaming, "use_reader_memory_pool", lambda: None)
    items = iter(streaming.GroupedStream(stream, group=2))
    (line,) = (tmp_path / "trace.jsonl").read_text().splitlines()  # before any item was asked for
    trace = json.loads(line)
    assert trace["began"] <= trace["chunk 1 read"] <= trace["chunk 1 encoded"] <= trace["first item written"]
    got = [b.labels.numpy() for item in items for b in item.batches()]
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_shuffle_start_outside_zero_one_is_refused_naming_the_field(shards):
    train, valid, _ = shards
    raw = config(data={"train": str(train), "valid": str(valid), "split": {"method": "files"}, "shuffle_start": 0})
    with pytest.raises(ValueError, match="data.shuffle_start.*must be in \\(0, 1\\], got 0"):
        experiment_from_dict(raw)


def test_a_pickled_encoder_rebuilds_its_small_batch_lookup_and_encodes_the_same(shards):
    """The string lookup's dict is not pickled (~90% of unpickling an encoder, which each forkserver reader
    does): it is rebuilt on first use, and a small batch (the dict's path) encodes as before."""
    _, _, frame = shards
    cfg = stream_config(*shards[:2])
    encoder = FeatureEncoder(cfg.features).fit(frame.iloc[:240])
    encoder.prepare_lookups()
    copy = pickle.loads(pickle.dumps(encoder))
    lookups = [s["_str_lookup"] for s in copy.state.values() if isinstance(s, dict) and "_str_lookup" in s]
    assert lookups and all(lookup._ids is None for lookup in lookups)
    small = pa.Table.from_pandas(frame.iloc[240:250], preserve_index=False)
    for a, b in zip(encoder.transform(small), copy.transform(small)):
        np.testing.assert_array_equal(a, b)
