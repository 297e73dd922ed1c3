"""Overlapped epochs of a streaming source: the next epoch's readers start before this epoch ends, its batches
are the ones read one epoch after the other, and whatever stops the reading (the end, early stopping, an
error) leaves no reader process and no shared-memory segment behind."""

import multiprocessing

import pytest
import torch

import mtrank
from mtrank.data import streaming
from mtrank.data.streaming import EpochReaders, stream_items
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.sources import StreamSource
from tabular_helpers import one_torch_thread  # noqa: F401
from test_prefetch import assert_same_batches, stream_of
from test_tabular_streaming import shards, stream_config  # noqa: F401

CPU = torch.device("cpu")


def mapped_segments() -> int:
    """Shared-memory segments (torch's) mapped in this process."""
    with open("/proc/self/maps") as maps:
        return sum("/dev/shm/torch_" in line for line in maps)


def assert_nothing_left(before: int) -> None:
    assert multiprocessing.active_children() == []
    assert not streaming.SEGMENTS
    assert mapped_segments() == before


@pytest.mark.parametrize("workers,ahead", [(2, 2), (2, None), (0, None)])
def test_overlapped_epochs_yield_the_batches_of_epochs_read_one_after_the_other(shards, workers, ahead):  # noqa: F811
    stream = stream_of(shards)
    expected = [list(StreamSource(stream, workers, CPU, group=1, ahead=0).keys(epoch)) for epoch in range(3)]
    source = StreamSource(stream, workers, CPU, group=1, ahead=ahead)
    for epoch in range(3):
        batches, started = [], []  # the epoch whose readers were started ahead, at each batch
        for batch in source.keys(epoch):
            batches.append(batch)
            started.append(None if source.next_readers is None else source.next_readers.epoch)
        assert_same_batches(batches, expected[epoch])
        if workers == 0:  # read in this process: nothing to start ahead
            assert started == [None] * len(batches)
        else:  # started before the last batch of this epoch
            assert started[-2] == epoch + 1
        if ahead == 2:  # at most 2 one-batch items before the end: not at the start
            assert started[0] is None
    source.close()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("workers,method", [(0, None), (2, "fork"), (2, "forkserver")])
def test_readers_started_for_the_next_epoch_leave_this_epochs_readers_reading_this_epoch(shards, workers, method):  # noqa: F811
    stream = stream_of(shards)

    def batches(items):
        return [b for item in items for b in item.batches()]

    expected = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        expected.append(batches(stream_items(stream, workers, group=2, start_method=method)))
    stream.set_epoch(0)
    this = EpochReaders(stream, workers, group=2, start_method=method)
    following = EpochReaders(stream, workers, group=2, start_method=method, epoch=1)
    stream.set_epoch(7)  # what a consumer might do meanwhile: changes neither reading
    assert (this.epoch, following.epoch) == (0, 1)
    assert_same_batches(batches(this), expected[0])
    assert_same_batches(batches(following), expected[1])
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("limit,ahead", [(None, True), (17, True), (16, False), (10, False)])
def test_no_readers_start_ahead_when_the_consumer_takes_no_more_batches_than_this_epoch_holds(shards, limit, ahead):  # noqa: F811
    source = StreamSource(stream_of(shards), 2, CPU, group=1)  # 15 batches of 16 rows, 16 with 2 short ones
    batches = list(source.keys(0, limit=limit))
    assert len(batches) == 16 and (source.next_readers is not None) == ahead
    source.close()


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_a_consumer_stopping_mid_epoch_stops_the_readers_of_this_epoch_and_the_next(shards):  # noqa: F811
    stream = stream_of(shards)
    before = mapped_segments()
    # "pinned" without CUDA: the readers' pooled buffers are mapped here (streaming.SEGMENTS), never released
    source = StreamSource(stream, 2, CPU, group=1, ahead=3, pin_memory=True)
    keys = source.keys(0)
    while source.next_readers is None:
        next(keys)  # (each batch, a view of its item's segment, dropped at once)
    following = source.next_readers.processes
    assert len(following) == 2 and all(p.is_alive() for p in following)
    assert streaming.SEGMENTS
    keys.close()  # what the training loop does when it stops (early stopping, the last step, an error)
    assert source.next_readers is None and not any(p.is_alive() for p in following)
    assert_nothing_left(before)


def test_readers_started_for_an_epoch_that_is_never_read_stop_when_closed_or_freed(shards):  # noqa: F811
    stream = stream_of(shards)
    source = StreamSource(stream, 2, CPU, group=1)
    list(source.keys(0))
    assert source.next_readers.epoch == 1 and len(multiprocessing.active_children()) == 2
    source.close()
    assert multiprocessing.active_children() == []
    list(source.keys(0))
    assert len(multiprocessing.active_children()) == 2
    del source  # freed: the readers started ahead stop (EpochReaders' finalizer)
    assert multiprocessing.active_children() == []


def test_a_streaming_run_that_stops_early_leaves_no_reader_process(shards, tmp_path):  # noqa: F811
    train, valid, _ = shards
    # an lr too small to change a float32 weight: no validation improvement after the first, stopped at step 10
    cfg = stream_config(train, valid, epochs=3, batch_size=16, lr=1e-30, eval_every=5, early_stopping_patience=1)
    cfg.data.workers = 2
    before = mapped_segments()
    result = mtrank.fit(cfg, output=tmp_path / "model")
    assert result.train_result.stopped_early and result.train_result.steps == 10  # mid-epoch 0 (15 batches)
    assert_nothing_left(before)


class FailingStep:
    """A training step that fails at step ``at`` (after the next epoch's readers started)."""

    graph = None

    def __init__(self, tasks: int, at: int) -> None:
        self.outputs, self.at, self.steps = (torch.zeros(1), torch.zeros(1, tasks)), at, 0

    def __call__(self, batch):
        self.steps += 1
        if self.steps == self.at:
            raise RuntimeError("the step failed")
        return self.outputs


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer step
@pytest.mark.parametrize("fail_at", [14, None])  # in epoch 0 of 15 batches; none: 3 whole epochs
def test_a_streaming_run_that_fails_or_ends_leaves_no_reader_process(shards, fail_at):  # noqa: F811
    stream = stream_of(shards)
    cfg = stream_config(*shards[:2], epochs=3, batch_size=16)
    encoder = stream.encoder
    trainer = Trainer(MultiTaskModel(cfg.model_config(encoder.num_dense, encoder.vocab_sizes), seed=0), cfg.train)
    step = FailingStep(len(cfg.tasks), at=fail_at or 0)
    trainer.loop.train_step = lambda source: step
    source = StreamSource(stream, 2, CPU, group=1)
    started = []
    readers = source.readers
    source.readers = lambda epoch: started.append(epoch) or readers(epoch)
    before = mapped_segments()
    if fail_at is None:
        assert trainer.fit(source).steps == 45
        assert started == [0, 1, 2]  # each ahead of its epoch but the first; none for an epoch 3
    else:
        with pytest.raises(RuntimeError, match="the step failed") as failure:
            trainer.fit(source)
        # the traceback holds the loop's frame (and its generator of batches): the readers stopped all the same
        assert failure.traceback and multiprocessing.active_children() == [] and not streaming.SEGMENTS
        del failure  # and the last batch, a view of its item's segment, with it
    assert source.next_readers is None
    assert_nothing_left(before)


def test_mtrank_fit_starts_the_first_epochs_readers_before_the_model_and_trains_the_same(shards, tmp_path, monkeypatch):  # noqa: F811
    """A streaming ``mtrank.fit`` starts epoch 0's readers (forked: CUDA is not initialised yet) before it builds
    the model; the run ends with the weights of one whose readers start at the first batch."""
    train, valid, _ = shards
    from mtrank import pipeline

    def fit(start: bool):
        cfg = stream_config(train, valid, epochs=2, batch_size=16, lr=0.01)
        cfg.data.workers = 2
        readers_at_build = []

        def model(*args, **kwargs):
            readers_at_build.append(len(multiprocessing.active_children()))
            return MultiTaskModel(*args, **kwargs)

        monkeypatch.setattr(pipeline, "MultiTaskModel", model)
        if not start:
            monkeypatch.setattr(StreamSource, "start", lambda self, epoch=0: None)
        result = mtrank.fit(cfg, output=None)
        monkeypatch.undo()
        return result, readers_at_build

    early, readers_early = fit(start=True)
    late, readers_late = fit(start=False)
    assert readers_early == [2] and readers_late == [0]
    assert early.train_result.steps == late.train_result.steps == 30
    for (name, a), b in zip(early.model.state_dict().items(), late.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert multiprocessing.active_children() == []


def test_readers_started_before_the_memory_planner_refuses_stop_with_the_refusal(shards, monkeypatch):  # noqa: F811
    train, valid, _ = shards
    from mtrank import pipeline

    def refuse(*args, **kwargs):
        assert len(multiprocessing.active_children()) == 2  # started, reading
        raise MemoryError("does not fit")

    monkeypatch.setattr(pipeline, "check_training_fits", refuse)
    cfg = stream_config(train, valid, epochs=1, batch_size=16)
    cfg.data.workers = 2
    with pytest.raises(MemoryError, match="does not fit"):
        mtrank.fit(cfg, output=None)
    assert multiprocessing.active_children() == []
    assert not streaming.SEGMENTS
