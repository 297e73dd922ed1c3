"""A streaming reader's way to its first item, for finding where a run's start-up goes (``EncodedStream.trace``:
a debugging aid, off by default; ``benchmarks/data_pipeline.py train --timeline`` turns it on).

Each reader process appends one JSON line to the trace file when it has written its first item: its pid,
worker and epoch, and the times (``time.perf_counter()`` seconds: the monotonic clock, comparable between the
processes of one machine) at which its stream was being unpickled and was unpickled (a reader started by a
forkserver), it began reading, read and encoded each record batch, and wrote the first item.
"""

from __future__ import annotations

import json
import os
import time


class ReaderTrace:
    """One reader's trace (see the module docstring): ``times`` so far (e.g. the stream's unpickling), then
    ``trace("read")`` / ``trace("encoded")`` per record batch and :meth:`item` per item written."""

    def __init__(self, path: str, worker: int, epoch: int, times: dict[str, float]) -> None:
        self.path = path
        self.times: dict = {"pid": os.getpid(), "worker": worker, "epoch": epoch, **times}
        self.times["began"] = time.perf_counter()
        self.chunks, self.written = 0, False

    def __call__(self, event: str) -> None:
        if not self.written:
            self.chunks += event == "read"
            self.times[f"chunk {self.chunks} {event}"] = time.perf_counter()

    def item(self) -> None:
        """An item was written: the first one ends the trace (its line is appended to the file)."""
        if not self.written:
            self.written = True
            self.times["first item written"] = time.perf_counter()
            with open(self.path, "a") as out:
                out.write(json.dumps(self.times) + "\n")
