"""The census audit (issue 14): Ma et al.'s Tables 1 and 2 run so that they can decide the paper's claims.

What it changes against :mod:`mtrank.experiments.census` (the earlier protocol, kept for its committed runs):

* **Search, not a grid.** Per method (and for Single-task per task) an optuna TPE search with the same budget:
  ``trials`` trials over the learning rate, the width of the shared part (hidden units of the bottom, or of all
  experts together; at most 2,048, the paper's cap) and, for OMoE / MMoE, the number of experts. A trial trains
  ``tune_seeds`` runs as one ensemble for up to ``max_epochs`` epochs with early stopping on validation and
  scores their mean validation AUC of its task. Every chosen value is checked to lie strictly inside its range;
  one at an edge that is not a cap of the paper's is widened once and searched again (``widen_trials``).
* **Independent Single-task.** One full model per task, own embeddings, each tuned on its own task.
* **Splits and runs.** ``runs`` runs per method on each of ``splits`` random 1:1 validation / test splits of the
  test file (split 0 is the split of the earlier runs, "the paper's 1:1 split"); run (k, s) has seed
  ``1000 k + s`` for initialisation and batch order, the same for every method, so runs pair up. The runs of one
  method on one split train as one vectorised ensemble (chunks of ``max_members``); every member reads the
  shared held-out rows and is scored on its own split's rows (:class:`SplitEnsemble`, which also trains members
  of several splits together).
* **A matched parameter budget**: Shared-Bottom as wide as makes its parameter count MMoE's tuned one.
* **A leakage ablation**: the same runs without ``leak_columns`` (the household columns, whose values name the
  marital status: "Child <18 never marr not in subfamily", ...), with each method's tuned setting.

Each job (one search, or one method's runs on one split) writes its part under ``out/parts`` as it ends; a
rerun with the same config skips finished parts, so a long run can be split across calls. The statistics and
the report are :mod:`mtrank.experiments.census_audit_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data.census import CATEGORICAL, NUMERIC, load_census
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.stats import auc, auc_components
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.trainer import resolve_device

METHODS = ("single_task", "shared_bottom", "omoe", "mmoe")
MOE = ("omoe", "mmoe")
LEAK_COLUMNS = ("det_hh_fam_stat", "det_hh_summ")  # their values name the marital status (see the report)
WIDTH_CAP = 2048  # the paper's cap on hidden units
TUNE_SEED = 900_000  # seeds of the tuning runs: the same for every trial (common random numbers)
SPLIT_STRIDE = 1000  # run s of split k has seed 1000 k + s


@dataclass
class AuditConfig:
    """The audit's budget (the same for every method). Ranges are ``[low, high]``; the learning rate and the
    width are searched on a log scale."""

    groups: list[int] = field(default_factory=lambda: [1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    trials: int = 30  # per search
    widen_trials: int = 15  # more trials after widening a range whose optimum sat at its edge (0: flag only)
    tune_seeds: int = 2  # runs per trial, one ensemble; their mean validation AUC is the trial's score
    lr_range: list[float] = field(default_factory=lambda: [3e-4, 3e-2])
    width_range: list[int] = field(default_factory=lambda: [32, WIDTH_CAP])
    experts_range: list[int] = field(default_factory=lambda: [2, 16])
    runs: int = 100  # per split and method
    splits: int = 5  # split seeds 0 .. splits-1
    ablation_runs: int = 100  # per split and method, without the leak columns (0: no ablation)
    matched_budget: bool = True  # Shared-Bottom at MMoE's parameter count
    max_epochs: int = 15
    evals_per_epoch: int = 2
    patience: int = 6  # evaluations without improvement before a run stops
    batch_size: int = 1024
    embedding_dim: int = 4
    tower_hidden: list[int] = field(default_factory=lambda: [8])
    leak_columns: list[str] = field(default_factory=lambda: list(LEAK_COLUMNS))
    train_rows: int = 0  # a fixed random subset of the training file (0: all 199,523 rows)
    held_rows: int = 0  # a fixed random subset of the test file's rows (0: all 99,762), split 1:1 by each split
    max_members: int = 500  # runs per ensemble at most
    collapse_below: float = 0.6  # a run below this test AUC learned nothing
    n_boot: int = 10_000
    device: str = "cpu"
    workers: int = 1  # processes running jobs side by side (searches, then runs), each with this one's threads
    preset: str = "full"

    @classmethod
    def full(cls) -> AuditConfig:
        """The issue's budget: 100 runs per method and group on each of 5 splits; for the H200."""
        return cls()

    @classmethod
    def medium(cls) -> AuditConfig:
        """A CPU-sized run (about 20 minutes of one core for both groups): 20,000 training rows and 20,000
        held-out rows (random, fixed), 6 trials per search of one run, 8 runs on each of 3 splits (4 without the
        household columns), 8 epochs at most. It exercises the whole protocol on less data; its AUCs sit below
        the full data's and its intervals are wide."""
        return cls(
            trials=6,
            widen_trials=3,
            tune_seeds=1,
            width_range=[16, 512],
            runs=8,
            splits=3,
            ablation_runs=4,
            max_epochs=8,
            patience=4,
            train_rows=20_000,
            held_rows=20_000,
            n_boot=4000,
            preset="medium",
        )

    @classmethod
    def quick(cls) -> AuditConfig:
        """Seconds: group 1, 3 trials, 2 runs on 2 splits, 3,000 training and 4,000 held-out rows."""
        return cls(
            groups=[1],
            trials=3,
            widen_trials=2,
            tune_seeds=1,
            width_range=[8, 64],
            experts_range=[2, 4],
            runs=2,
            splits=2,
            ablation_runs=1,
            max_epochs=2,
            patience=2,
            batch_size=256,
            train_rows=3000,
            held_rows=4000,
            n_boot=500,
            preset="quick",
        )

    def check(self) -> AuditConfig:
        problems = {
            "methods": set(self.methods) <= set(METHODS) and "mmoe" in self.methods,
            "groups": set(self.groups) <= {1, 2} and bool(self.groups),
            "splits": 1 <= self.splits < SPLIT_STRIDE,
            "runs": 1 <= self.runs < SPLIT_STRIDE and 0 <= self.ablation_runs < SPLIT_STRIDE,
            "trials": self.trials >= 1 and self.tune_seeds >= 1,
            "width_range": 1 <= self.width_range[0] < self.width_range[1] <= WIDTH_CAP,
            "lr_range": 0 < self.lr_range[0] < self.lr_range[1],
            "experts_range": 1 <= self.experts_range[0] < self.experts_range[1],
            "leak_columns": set(self.leak_columns) <= set(CATEGORICAL),
        }
        for name, ok in problems.items():
            if not ok:
                raise ValueError(f"census audit: {name}={getattr(self, name)!r} is out of range (see AuditConfig)")
        return self


# ---------------------------------------------------------------------------------------------- data


@dataclass
class AuditData:
    """One task group's rows: the training file (or a fixed subset) and every row of the test file, which each
    split divides 1:1 into validation and test rows exactly as :func:`~mtrank.data.census.load_census` does."""

    train: TensorData
    held: TensorData  # the test file's rows in file order
    tasks: list[TaskConfig]
    vocab_sizes: list[int]
    columns: list[str]  # the categorical columns, in ``sparse`` order
    num_dense: int
    group: int

    @classmethod
    def load(cls, path: Path, group: int, train_rows: int = 0, held_rows: int = 0) -> AuditData:
        data = load_census(path, group)
        order = torch.cat([data.valid_rows, data.test_rows])
        held = _cat(data.valid, data.test)[torch.argsort(order)]  # back to the file's order
        train = data.train
        if train_rows and train_rows < len(train):
            rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_rows]
            train = train[rows.sort().values]
        if held_rows and held_rows < len(held):
            rows = torch.randperm(len(held), generator=torch.Generator().manual_seed(1))[:held_rows]
            held = held[rows.sort().values]
        columns = list(data.categorical_columns)
        return cls(train, held, data.tasks, list(data.vocab_sizes), columns, data.num_dense, group)

    def split(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation and test rows of ``held`` for split ``seed`` (``load_census(split_seed=seed)``'s)."""
        order = torch.randperm(len(self.held), generator=torch.Generator().manual_seed(seed))
        half = len(self.held) // 2
        return order[:half].sort().values, order[half:].sort().values

    def select(self, task: int | None = None, drop: list[str] | tuple = ()) -> AuditData:
        """The same rows with one task's labels only (``task``) and without the categorical columns ``drop``."""
        unknown = set(drop) - set(self.columns)
        if unknown:
            raise ValueError(f"census audit: no categorical column {sorted(unknown)}; columns: {self.columns}")
        keep = [i for i, c in enumerate(self.columns) if c not in drop]
        labels = slice(None) if task is None else slice(task, task + 1)

        def view(d: TensorData) -> TensorData:
            return dataclasses.replace(d, sparse=d.sparse[:, keep], labels=d.labels[:, labels])

        tasks = self.tasks if task is None else [self.tasks[task]]
        return dataclasses.replace(
            self,
            train=view(self.train),
            held=view(self.held),
            tasks=[dataclasses.replace(t) for t in tasks],
            vocab_sizes=[self.vocab_sizes[i] for i in keep],
            columns=[self.columns[i] for i in keep],
        )


def _cat(a: TensorData, b: TensorData) -> TensorData:
    def both(name: str) -> torch.Tensor | None:
        x, y = getattr(a, name), getattr(b, name)
        return None if x is None else torch.cat([x, y])

    return TensorData(**{f.name: both(f.name) for f in dataclasses.fields(TensorData)})


# ---------------------------------------------------------------------------------------------- models


def audit_model(method: str, params: dict, data: AuditData, cfg: AuditConfig) -> ModelConfig:
    """``method`` with searched ``params`` (``width``: hidden units of the shared part; ``experts``) on ``data``'s
    tasks. Single-task is one task's own full model (a bottom of ``width`` units; ``data`` holds that task)."""
    experts = params.get("experts", 1)
    block: dict = {"type": "shared_bottom" if method == "single_task" else method}
    if method in MOE:
        block["num_experts"] = experts
    return ModelConfig(
        inputs={"num_dense": data.num_dense, "vocab_sizes": list(data.vocab_sizes), "embedding_dim": cfg.embedding_dim},
        tasks=[dataclasses.replace(t) for t in data.tasks],
        block=block,
        experts={"hidden": [max(1, params["width"] // experts)]},
        towers={"hidden": list(cfg.tower_hidden)},
    )


def matched_width(target_params: int, data: AuditData, cfg: AuditConfig) -> int:
    """The Shared-Bottom width whose parameter count is closest to ``target_params`` (the count is linear in it)."""

    def count(width: int) -> int:
        return count_parameters(MultiTaskModel(audit_model("shared_bottom", {"width": width}, data, cfg)))

    slope = count(101) - count(100)
    return max(1, round(100 + (target_params - count(100)) / slope))


# ---------------------------------------------------------------------------------------------- training


def stacked_auc(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """AUC of each row of ``scores [R, n]`` for 0/1 ``labels [R, n]`` (ties count half), on any device: the
    Mann-Whitney statistic from midranks found by ``searchsorted`` in the sorted row. NaN where a row has one
    class. Equal to :func:`mtrank.stats.auc` (tested)."""
    scores = scores.contiguous()
    ordered = scores.sort(dim=-1).values
    below = torch.searchsorted(ordered, scores, right=False)
    not_above = torch.searchsorted(ordered, scores, right=True)
    ranks = (below + not_above + 1).double() / 2  # 1-based midranks
    positive = labels > 0.5
    m = positive.sum(-1).double()
    n = positive.shape[-1] - m
    return ((ranks * positive).sum(-1) - m * (m + 1) / 2) / (m * n)


@dataclass
class HeldOutRows:
    """Rows of each member: ``index[r]`` selects member r's rows (its split's validation or test half) of the
    shared ``data`` (every held-out row)."""

    data: TensorData
    index: torch.Tensor  # [R, n]

    def __len__(self) -> int:
        return self.index.shape[1]


class SplitEnsemble(Ensemble):
    """An :class:`Ensemble` whose members are scored on their own split's rows of one shared held-out table:
    each evaluation predicts every held-out row once per member and takes each member's rows, so no member's
    copy of the data is made. Metrics: ``auc/<task>`` (all the loop needs to select steps and stop early)."""

    def held_logits(self, data: TensorData) -> torch.Tensor:
        """Task logits ``[R, N, K]`` of every member on every row of ``data`` (on the training device), in
        evaluation mode; half a million member-rows a time on a GPU, 32,768 on a CPU (whose caches a larger
        activation would leave)."""
        was_training = self.base.training
        self.base.eval()
        member_rows = 2**19 if self.device.type == "cuda" else 2**15
        chunk = max(64, member_rows // self.num_runs)
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(data), chunk):
                    part = data[start : start + chunk]
                    dense = part.dense.to(self.device).expand(self.num_runs, *part.dense.shape)  # (R, B, F)
                    sparse = part.sparse.to(self.device).expand(self.num_runs, *part.sparse.shape)  # (R, B, C)
                    out.append(self.logits(dense, sparse).float())
        finally:
            self.base.train(was_training)
        return torch.cat(out, 1)

    def evaluate(self, rows: HeldOutRows) -> list[dict[str, float]]:  # type: ignore[override]
        """AUC of each task on each member's rows; only the rows some member needs are predicted."""
        needed = torch.unique(rows.index)  # sorted; all held-out rows once several splits are trained
        logits = self.held_logits(rows.data[needed])  # (R, rows needed, K)
        index = torch.searchsorted(needed, rows.index).to(logits.device)  # (R, n) positions in ``needed``
        picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # (R, n, K)
        labels = rows.data.labels.to(logits.device)[rows.index.to(logits.device)]  # (R, n, K)
        aucs = torch.stack([stacked_auc(labels[..., k], picked[..., k]) for k in range(len(self.task_names))], -1)
        return [{f"auc/{t}": float(v) for t, v in zip(self.task_names, row)} for row in aucs.cpu().tolist()]


def train_config(cfg: AuditConfig, lr: float, rows: int, monitor: str) -> TrainConfig:
    steps_per_epoch = -(-rows // cfg.batch_size)
    return TrainConfig(
        lr=lr,
        batch_size=cfg.batch_size,
        epochs=cfg.max_epochs,
        eval_every=max(1, steps_per_epoch // cfg.evals_per_epoch),
        early_stopping_patience=cfg.patience,
        monitor=monitor,
        device=cfg.device,
        progress=False,
    )


def train_members(
    config: ModelConfig, lr: float, members: list[tuple[int, int]], data: AuditData, cfg: AuditConfig
) -> dict:
    """Train run ``(split, seed)`` of every member as one ensemble (chunks of ``max_members``); early stopping
    and step selection on the main task's validation AUC of the member's split. Returns per member: validation
    metrics, best step, whether it stopped early or its best step was the budget's last; and per split the test
    AUC of each run and the mean DeLong components of each task (:func:`mtrank.stats.auc_components`)."""
    device = resolve_device(cfg.device)
    held = data.held.to(device)
    splits = {k: data.split(k) for k in sorted({k for k, _ in members})}
    tasks = [t.name for t in config.tasks]
    train_cfg = train_config(cfg, lr, len(data.train), f"auc/{tasks[0]}")
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    total_steps = cfg.max_epochs * steps_per_epoch
    out: dict = {"members": [], "splits": {}, "seconds": 0.0, "total_steps": total_steps}
    out["eval_every"] = train_cfg.eval_every
    logits_by_member = []
    for start in range(0, len(members), cfg.max_members):
        chunk = members[start : start + cfg.max_members]
        ensemble = SplitEnsemble(config, [SPLIT_STRIDE * k + s for k, s in chunk], cfg.device)
        valid = HeldOutRows(held, torch.stack([splits[k][0] for k, _ in chunk]).to(device))
        result = ensemble.fit(EnsembleData.shared(data.train), valid, train_cfg)
        out["seconds"] += result.seconds
        for r, (k, s) in enumerate(chunk):
            run = result.runs[r]
            out["members"].append(
                {
                    "split": k,
                    "seed": s,
                    "valid": run.best_metrics,
                    "best_step": run.best_step,
                    "stopped_early": run.stopped_early,
                    "epochs": run.history[-1]["step"] / steps_per_epoch,  # trained until it stopped
                }
            )
        logits_by_member.append(ensemble.held_logits(held).cpu())
    logits = torch.cat(logits_by_member).double().numpy()  # (R, N, K), best-validation weights
    labels = data.held.labels.numpy()
    for k, (_, test_rows) in splits.items():
        rows = np.flatnonzero([m == k for m, _ in members])
        entry = {"seeds": [members[r][1] for r in rows]}
        for t, task in enumerate(tasks):
            y = labels[test_rows.numpy(), t]
            components = auc_components(y, logits[rows][:, test_rows.numpy(), t])
            mean = components.mean()
            entry[f"auc/{task}"] = components.auc.tolist()
            entry[f"components/{task}"] = (mean.positive.astype(np.float32), mean.negative.astype(np.float32))
        out["splits"][k] = entry
    return out


# ---------------------------------------------------------------------------------------------- the search


def search_space(method: str, cfg: AuditConfig, widened: dict | None = None) -> dict[str, tuple]:
    """``{name: (low, high, log)}`` of ``method``'s search; ``widened`` overrides ranges."""
    space = {
        "lr": (cfg.lr_range[0], cfg.lr_range[1], True),
        "width": (cfg.width_range[0], cfg.width_range[1], True),
    }
    if method in MOE:
        space["experts"] = (cfg.experts_range[0], cfg.experts_range[1], False)
    for name, (low, high) in (widened or {}).items():
        space[name] = (low, high, space[name][2])
    return space


def edge_check(value: float, low: float, high: float, log: bool, margin: float = 0.05) -> str:
    """Where ``value`` sits in ``[low, high]``: ``inside``, ``lower edge`` or ``upper edge`` (within ``margin``
    of the range's length from an end, on the log scale for a log range; an integer range's end values count).

    >>> edge_check(1e-2, 3e-4, 3e-2, True), edge_check(2, 2, 16, False), edge_check(5, 2, 16, False)
    ('inside', 'lower edge', 'inside')
    """
    f = (lambda x: math.log(x)) if log else float
    position = (f(value) - f(low)) / (f(high) - f(low))
    if position <= margin:
        return "lower edge"
    if position >= 1 - margin:
        return "upper edge"
    return "inside"


def widen(name: str, side: str, low: float, high: float) -> tuple[float, float] | None:
    """The range after widening ``name`` past its ``side`` edge (x4 for lr and width, x2 for experts); None
    where the edge is a fixed limit (the paper's 2,048-unit cap, at least 2 experts, at least 4 units)."""
    factor = 2 if name == "experts" else 4
    if side == "upper edge":
        new_high = min(high * factor, WIDTH_CAP) if name == "width" else high * factor
        return None if new_high <= high else (low, int(new_high) if name != "lr" else new_high)
    floor = {"experts": 2, "width": 4}.get(name, 0.0)
    new_low = max(low / factor, floor) if name != "experts" else max(low // factor, floor)
    return None if new_low >= low else (int(new_low) if name != "lr" else new_low, high)


def run_search(job: dict, cfg: AuditConfig, data: AuditData, part: Path, deadline: float = math.inf) -> dict:
    """An optuna TPE search of ``job['method']`` on ``job['task']``'s validation AUC (split 0), ``cfg.trials``
    trials, then at most one widening round; every finished trial is written to ``part`` (a rerun resumes)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    method, task = job["method"], job["task"]
    task_data = data.select(task) if method == "single_task" else data
    monitor = data.tasks[task].name
    state = json.loads(part.read_text()) if part.is_file() else {"trials": [], "widened": {}}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1000 * data.group + task))
    for done in state["trials"]:
        study.add_trial(
            optuna.trial.create_trial(
                params=done["params"], distributions=_distributions(done["space"]), value=done["value"]
            )
        )
    tune = [(0, TUNE_SEED + i) for i in range(cfg.tune_seeds)]

    def trial_round(space: dict, until: int) -> None:
        while len(state["trials"]) < until:
            if time.time() > deadline:
                raise _Stopped
            trial = study.ask(_distributions(space))
            params = dict(trial.params)
            config = audit_model(method, params, task_data, cfg)
            trained = train_members(config, params["lr"], tune, task_data, cfg)
            value = float(np.mean([m["valid"].get(f"auc/{monitor}", math.nan) for m in trained["members"]]))
            study.tell(trial, value if math.isfinite(value) else 0.0)
            state["trials"].append(
                {
                    "params": params,
                    "space": {k: list(v) for k, v in space.items()},
                    "value": value if math.isfinite(value) else 0.0,
                    "params_count": count_parameters(MultiTaskModel(config)),
                    "epochs": [m["epochs"] for m in trained["members"]],
                }
            )
            write_atomic(part, state)

    space = search_space(method, cfg)
    trial_round(space, cfg.trials)
    best = max(state["trials"], key=lambda t: t["value"])
    checks = {n: edge_check(best["params"][n], *space[n]) for n in space}
    if not state["widened"] and cfg.widen_trials:
        widened = {}
        for name, side in checks.items():
            if side != "inside" and (new := widen(name, side, *space[name][:2])) is not None:
                widened[name] = list(new)
        state["widened"] = widened or {"none": True}
    widened = {k: v for k, v in state["widened"].items() if k != "none"}
    if widened:
        space = search_space(method, cfg, widened)
        trial_round(space, cfg.trials + cfg.widen_trials)
        best = max(state["trials"], key=lambda t: t["value"])
        checks = {n: edge_check(best["params"][n], *space[n]) for n in space}
    state.update(
        method=method,
        task=monitor,
        best=best,
        space={k: list(v) for k, v in space.items()},
        checks=checks,
        limits={n: side != "inside" and widen(n, side, *space[n][:2]) is None for n, side in checks.items()},
        done=True,
    )
    write_atomic(part, state)
    return state


def _distributions(space: dict) -> dict:
    import optuna.distributions as d

    out = {}
    for name, (low, high, log) in space.items():
        if name == "lr":
            out[name] = d.FloatDistribution(low, high, log=log)
        else:
            out[name] = d.IntDistribution(int(low), int(high), log=log)
    return out


# ---------------------------------------------------------------------------------------------- jobs


def search_jobs(cfg: AuditConfig) -> list[dict]:
    """One search per (group, method), two for Single-task (one per task)."""
    jobs = []
    for group in cfg.groups:
        for method in cfg.methods:
            for task in (0, 1) if method == "single_task" else (0,):
                jobs.append({"kind": "search", "group": group, "method": method, "task": task})
    return jobs


def final_jobs(cfg: AuditConfig) -> list[dict]:
    """Per group and split: each method's runs with all columns and (``ablation_runs``) without the leak
    columns; with ``matched_budget``, Shared-Bottom at MMoE's parameter count. One job per split keeps a job
    short enough to finish inside one call of a time-limited machine (the parts let the next call go on)."""
    variants = ["full"] + (["noleak"] if cfg.ablation_runs else [])
    jobs = []
    for group in cfg.groups:
        for split in range(cfg.splits):
            for variant in variants:
                for method in cfg.methods:
                    for task in (0, 1) if method == "single_task" else (None,):
                        jobs.append(_final(group, variant, method, task, split))
            if cfg.matched_budget and "shared_bottom" in cfg.methods:
                jobs.append(_final(group, "matched", "shared_bottom", None, split))
    return jobs


def _final(group: int, variant: str, method: str, task: int | None, split: int) -> dict:
    return {"kind": "final", "group": group, "variant": variant, "method": method, "task": task, "split": split}


def job_name(job: dict) -> str:
    task = "" if job["task"] is None else f"-task{job['task']}"
    if job["kind"] == "search":
        return f"search-g{job['group']}-{job['method']}{task}"
    return f"final-g{job['group']}-{job['variant']}-{job['method']}{task}-split{job['split']}"


def search_part(parts: Path, group: int, method: str, task: int = 0) -> dict:
    name = job_name({"kind": "search", "group": group, "method": method, "task": task})
    return json.loads((parts / f"{name}.json").read_text())


def run_final(job: dict, cfg: AuditConfig, data: AuditData, parts: Path) -> dict:
    """The runs of one (group, variant, method[, task]) on one split; writes ``parts/<name>.json`` and ``.npz``."""
    method, variant = job["method"], job["variant"]
    task = job["task"] if job["task"] is not None else 0
    params = dict(search_part(parts, job["group"], method, task)["best"]["params"])
    drop = cfg.leak_columns if variant == "noleak" else ()
    view = data.select(job["task"], drop) if method == "single_task" else data.select(None, drop)
    if variant == "matched":
        mmoe = search_part(parts, job["group"], "mmoe")["best"]
        params["width"] = matched_width(mmoe["params_count"], view, cfg)
    config = audit_model(method, params, view, cfg)
    runs = cfg.runs if variant != "noleak" else cfg.ablation_runs
    members = [(job["split"], s) for s in range(runs)]
    trained = train_members(config, params["lr"], members, view, cfg)
    arrays = {}
    for k, entry in trained["splits"].items():
        for key in [key for key in entry if key.startswith("components/")]:
            positive, negative = entry.pop(key)
            arrays[f"{k}/{key}/positive"], arrays[f"{k}/{key}/negative"] = positive, negative
    part = {
        **job,
        "params": params,
        "params_count": count_parameters(MultiTaskModel(config)),
        "tasks": [t.name for t in view.tasks],
        "columns": len(view.columns),
        "members": trained["members"],
        "splits": {str(k): v for k, v in trained["splits"].items()},
        "seconds": trained["seconds"],
        "total_steps": trained["total_steps"],
        "eval_every": trained["eval_every"],
        "done": True,
    }
    name = job_name(job)
    with open(parts / f"{name}.tmp.npz", "wb") as file:
        np.savez_compressed(file, **{k.replace("/", "|"): v for k, v in arrays.items()})
    os.replace(parts / f"{name}.tmp.npz", parts / f"{name}.npz")
    write_atomic(parts / f"{name}.json", part)  # last: its presence marks the job done
    return part


def write_atomic(path: Path, data: dict) -> None:
    """JSON to ``path`` through a temporary file and a rename: a killed process leaves the old file or the new."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_components(parts: Path, job: dict) -> dict[str, np.ndarray]:
    """``{"<split>/components/<task>/positive": array, ...}`` of a finished run job."""
    with np.load(parts / f"{job_name(job)}.npz") as arrays:
        return {k.replace("|", "/"): arrays[k] for k in arrays.files}


_DATA: dict = {}  # a process's loaded groups, (path, group, train_rows, held_rows) -> AuditData


def _data(path: Path, group: int, cfg: AuditConfig) -> AuditData:
    key = (str(path), group, cfg.train_rows, cfg.held_rows)
    if key not in _DATA:
        _DATA[key] = AuditData.load(path, group, cfg.train_rows, cfg.held_rows)
    return _DATA[key]


class _Stopped(Exception):
    """The deadline passed before a search's next trial (its finished trials are in its part)."""


def run_job(job: dict, cfg: AuditConfig, path: Path, parts: Path, deadline: float = math.inf) -> bool:
    """One search or one method's runs on one split (in this process or a worker); its part file is its result.
    False when the deadline (``time.time()``) stopped it; a search stops between trials, a run job does not."""
    data = _data(path, job["group"], cfg)
    try:
        if job["kind"] == "search":
            run_search(job, cfg, data, parts / f"{job_name(job)}.json", deadline)
        else:
            run_final(job, cfg, data, parts)
    except _Stopped:
        return False
    return True


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(
    jobs: list[dict], cfg: AuditConfig, path: Path, parts: Path, desc: str, progress: bool, deadline: float = math.inf
) -> bool:
    """Every job whose part is not finished, ``cfg.workers`` at a time (forked CPU processes, or spawned ones
    on a GPU, each with this process's thread count); none starts after ``deadline`` (``time.time()``).
    True when every job is finished."""
    todo = [j for j in jobs if not _finished(parts / f"{job_name(j)}.json")]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="job", disable=not progress)
    done = 0
    if cfg.workers <= 1 or len(todo) <= 1:
        for job in todo:
            if time.time() > deadline:
                break
            bar.set_postfix_str(job_name(job))
            done += run_job(job, cfg, path, parts, deadline)
            bar.update(1)
    else:
        cpu_linux = sys.platform == "linux" and resolve_device(cfg.device).type == "cpu"
        context = mp.get_context("fork" if cpu_linux else "spawn")
        with ProcessPoolExecutor(cfg.workers, context, _start_worker, (torch.get_num_threads(),)) as pool:
            waiting, running = list(todo), set()
            while waiting or running:
                while waiting and len(running) < cfg.workers and time.time() <= deadline:
                    running.add(pool.submit(run_job, waiting.pop(0), cfg, path, parts, deadline))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done += future.result()
                    bar.update(1)
    bar.close()
    return done == len(todo)


def _finished(part: Path) -> bool:
    return part.is_file() and json.loads(part.read_text()).get("done", False)


def run_audit(
    cfg: AuditConfig, data_path: Path, out: Path, progress: bool = True, stop_after: float = math.inf
) -> dict | None:
    """Searches, runs, statistics and the report (``out/results.md``, ``results.json``, figures). No job or
    trial starts after ``stop_after`` seconds; then, if some are left, it returns None without a report (the same
    call again goes on from the parts)."""
    from mtrank.experiments.census_audit_report import write_report

    cfg.check()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    numbers = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers", "device")}
    if saved.is_file() and {k: v for k, v in json.loads(saved.read_text()).items() if k in numbers} != numbers:
        raise ValueError(
            f"{out}: holds parts of a census audit with another config ({saved}); pass another --out, or delete "
            "the folder to start again"
        )
    saved.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    started = time.perf_counter()
    if cfg.workers > 1 and resolve_device(cfg.device).type == "cpu":
        for group in cfg.groups:  # loaded once before forking: the workers share it
            _data(data_path, group, cfg)
    deadline = time.time() + stop_after
    complete = run_jobs(search_jobs(cfg), cfg, data_path, parts, "census audit: searches", progress, deadline)
    complete = complete and run_jobs(final_jobs(cfg), cfg, data_path, parts, "census audit: runs", progress, deadline)
    if not complete:
        jobs = search_jobs(cfg) + final_jobs(cfg)
        finished = sum(_finished(parts / f"{job_name(j)}.json") for j in jobs)
        print(
            f"census audit: stopped after {stop_after:.0f} s with {finished} of {len(jobs)} jobs finished; the same "
            "command again goes on from their parts",
            flush=True,
        )
        return None
    leakage = {g: leakage_table(_data(data_path, g, cfg)) for g in cfg.groups}
    return write_report(cfg, out, leakage, time.perf_counter() - started)


def leakage_table(data: AuditData) -> list[dict]:
    """Each input column alone as a predictor of each task: the AUC on the held-out rows of its per-category
    positive rate on the training rows (numeric columns binned in deciles). Columns whose values name the
    marital status score far above the rest for it."""
    rows = []
    train, held = data.train, data.held
    columns = [(c, train.sparse[:, i], held.sparse[:, i]) for i, c in enumerate(data.columns)]
    for i, name in enumerate(NUMERIC[: data.num_dense]):
        values = train.dense[:, i].contiguous(), held.dense[:, i].contiguous()
        edges = torch.quantile(values[0], torch.linspace(0, 1, 11)[1:-1])
        columns.append((name, torch.bucketize(values[0], edges), torch.bucketize(values[1], edges)))
    for name, train_ids, held_ids in columns:
        size = int(max(train_ids.max(), held_ids.max())) + 1
        entry = {"column": name}
        for t, task in enumerate(data.tasks):
            y = train.labels[:, t].double()
            counts = torch.bincount(train_ids, minlength=size).double()
            rate = torch.bincount(train_ids, weights=y, minlength=size) / counts.clamp(min=1)
            rate[counts == 0] = y.mean()
            entry[task.name] = float(auc(held.labels[:, t].numpy(), rate[held_ids].numpy()))
        rows.append(entry)
    return rows


def worst_case_seconds(cfg: AuditConfig, data_path: Path) -> dict:
    """A time estimate on this device: 20 timed steps and one evaluation of the widest MMoE the search allows,
    as an ensemble of ``tune_seeds`` (a trial) and of the final runs' size, scaled to every run going the full
    ``max_epochs`` (early stopping only shortens it) and jobs one at a time (``workers`` only shortens it)."""
    data = _data(data_path, cfg.groups[0], cfg)
    device = resolve_device(cfg.device)
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    evals = cfg.max_epochs * cfg.evals_per_epoch
    params = {"lr": 1e-3, "width": cfg.width_range[1], "experts": 8}
    config = audit_model("mmoe", params, data, cfg)

    def timed(members: int) -> float:
        ensemble = SplitEnsemble(config, list(range(members)), cfg.device)
        held = data.held.to(device)
        rows = HeldOutRows(held, torch.stack([data.split(0)[0]] * members).to(device))
        short = dataclasses.replace(
            train_config(cfg, 1e-3, len(data.train), f"auc/{data.tasks[0].name}"), steps=20, eval_every=20
        )
        warm = dataclasses.replace(short, steps=2, eval_every=2)
        ensemble.fit(EnsembleData.shared(data.train), None, warm)
        result = ensemble.fit(EnsembleData.shared(data.train), None, short)
        start = time.perf_counter()
        ensemble.evaluate(rows)
        evaluation = time.perf_counter() - start
        return result.seconds / 20 * steps_per_epoch * cfg.max_epochs + evaluation * evals

    finals_members = min(cfg.max_members, cfg.runs)
    trial, final = timed(cfg.tune_seeds), timed(finals_members)
    searches = len(search_jobs(cfg)) * (cfg.trials + cfg.widen_trials)
    finals = len(final_jobs(cfg))  # one ensemble of at most ``runs`` members each (fewer without the leak columns)
    return {
        "device": str(device),
        "seconds_per_trial": trial,
        "seconds_per_final_ensemble": final,
        "searches_trials": searches,
        "final_ensembles": finals,
        "total_seconds": searches * trial + finals * final,
    }
