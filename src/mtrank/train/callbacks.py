"""Callbacks: what watches the one training loop. A progress bar, a JSON-lines history, TensorBoard.

The loop calls, on rank 0 only:

* ``on_train_begin(info)``: ``info`` holds ``total_steps``, ``start_step`` (after a resume), ``runs``, ``tasks``;
* ``on_step(step, loss)``: after every step; ``loss()`` returns the running mean training loss of run 0 (it
  waits for the device, so call it only when it will be shown);
* ``on_evaluate(step, records)``: at every evaluation, one history record per run (None for a run that has
  stopped early): ``step``, ``epoch``, ``samples``, ``lr``, ``train_loss``, ``train_loss/<task>`` and the
  validation metrics ``valid/<metric>/<task>`` (AUC, log loss, MSE, R², gate entropy), ``valid/loss``;
* ``on_train_end(results)``.

:func:`default_callbacks` builds what a :class:`~mtrank.config.TrainConfig` asks for: ``progress`` ->
:class:`ProgressBar`; ``log_dir`` -> :class:`JsonLinesLogger` (``history.jsonl``); ``tensorboard`` ->
:class:`TensorBoardLogger`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mtrank.config import TrainConfig


class Callback:
    """Base class: every hook does nothing."""

    def on_train_begin(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, loss: Callable[[], float]) -> None:
        pass

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        pass

    def on_train_end(self, results: list[Any]) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar over the steps with the running training loss (refreshed every ``every`` steps)."""

    def __init__(self, description: str = "train", every: int = 25) -> None:
        self.description, self.every = description, every
        self.bar: tqdm | None = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        runs = f" x{info['runs']}" if info["runs"] > 1 else ""
        self.bar = tqdm(
            total=info["total_steps"],
            initial=info["start_step"],
            desc=f"{self.description}{runs}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )

    def on_step(self, step: int, loss: Callable[[], float]) -> None:
        bar = self.bar
        if bar is not None and (step % self.every == 0 or step == bar.total):
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss():.4f}", refresh=False)

    def on_train_end(self, results: list[Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonLinesLogger(Callback):
    """Appends each evaluation's records to ``path`` as JSON lines (``{"run": r, ...record}``), flushed at once,
    so a run can be watched (``tail -f``) and read back with ``pandas.read_json(path, lines=True)``. A new run
    starts the file afresh; a resumed run appends."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if info["start_step"] == 0:
            self.path.write_text("")

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        with self.path.open("a") as f:
            for run, record in enumerate(records):
                if record is not None:
                    f.write(json.dumps({"run": run, **record}, default=float) + "\n")


class TensorBoardLogger(Callback):
    """Every numeric field of the records as a TensorBoard scalar (``train_loss/<task>``, ``valid/auc/<task>``,
    ``valid/gate_entropy/<task>``, ``lr``, ...), at its step; runs of an ensemble under ``run<r>/``.

    Needs the ``tensorboard`` package (``pip install mtrank[tensorboard]``); ``tensorboard --logdir LOG_DIR``
    shows it live."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                f"train.tensorboard needs the tensorboard package ({err}); install it with "
                "`pip install 'mtrank[tensorboard]'` or set train.tensorboard: false"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        several = len(records) > 1
        for run, record in enumerate(records):
            if record is None:
                continue
            for key, value in record.items():
                if key in ("step", "samples") or not isinstance(value, (int, float)) or math.isnan(value):
                    continue
                self.writer.add_scalar(f"run{run}/{key}" if several else key, value, step)
        self.writer.flush()

    def on_train_end(self, results: list[Any]) -> None:
        self.writer.close()


def default_callbacks(config: TrainConfig, description: str = "train") -> list[Callback]:
    """The callbacks ``config`` asks for (see the module docstring)."""
    callbacks: list[Callback] = []
    if config.progress:
        callbacks.append(ProgressBar(description))
    if config.log_dir:
        callbacks.append(JsonLinesLogger(Path(config.log_dir) / "history.jsonl"))
        if config.tensorboard:
            callbacks.append(TensorBoardLogger(config.log_dir))
    elif config.tensorboard:
        raise ValueError("train.tensorboard: needs train.log_dir (where the events are written)")
    return callbacks
