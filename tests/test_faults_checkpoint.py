"""Kill -9 during training, at every file boundary of a checkpoint write and at 20 seeded random moments: the
resume ends with the weights, best step and history of the uninterrupted run, bit for bit.

Each run is a tiny training in a forked child process (the parent has imported torch once, so a run costs
~0.3 s instead of a fresh interpreter's seconds) that is killed by the fault hook
(``MTRANK_FAULT_KILL_AT=LABEL:N``, :func:`mtrank.artifacts.fault_point`: SIGKILL, no clean-up) or, between
steps, by a callback that sends the same signal. ``test_the_cli_run_killed_mid_checkpoint_resumes_exactly`` does
it once through ``mtrank train`` in a fresh interpreter. CPU training is deterministic for a fixed thread count,
so "the same" is exact equality, not a tolerance.
"""

import json
import os
import random
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (Adam imports it on first use: once here, not in every forked child)
from safetensors.torch import load_file, save_file

from mtrank.artifacts import FAULT_ENV, fault_hits, reset_fault_hits
from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.callbacks import Callback
from tabular_helpers import config as experiment_config
from tabular_helpers import make_frame, one_torch_thread  # noqa: F401

# the first save_file builds numpy's ctypes types (a dlopen): once here, not in every forked child, where a lock
# held by another thread at the fork would block it
save_file({"warm": torch.zeros(1)}, os.devnull)

TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
# 10 steps an epoch, an evaluation and a checkpoint every 3 steps and at the end (7 writes in 20 steps), dropout:
# the resume must restore the random generator too
TRAIN = dict(batch_size=40, epochs=2, eval_every=3, keep_checkpoints=2, progress=False, seed=1)
DATA = make_synthetic(n=500, seed=0)
SPLITS = DATA[:400], DATA[400:]
EVERY_WRITE = ("mkdir", "file.weights.safetensors", "file.optimizer.safetensors", "file.best.safetensors")
EVERY_WRITE += ("file.trainer_state.json", "manifest", "rename", "publish")


def new_model() -> MultiTaskModel:
    config = ModelConfig(
        inputs={"num_dense": 100}, tasks=TASKS, block={"num_experts": 2}, experts={"hidden": [8], "dropout": 0.1}
    )
    return MultiTaskModel(config, seed=0)


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step, loss) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(ckpt: Path, out: Path | None = None, kill: tuple[str, int] | None = None) -> int:
    """Train (resuming ``ckpt``) in a forked child; ``kill``: ``("step", k)`` or ``(fault label, n)``. Writes the
    final weights, result and fault counts to ``out``; returns the child's exit code (-9: killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # one thread: deterministic, and no OpenMP pool across the fork
            reset_fault_hits()
            os.environ.pop(FAULT_ENV, None)
            callbacks = []
            if kill is not None and kill[0] == "step":
                callbacks.append(KillAtStep(kill[1]))
            elif kill is not None:
                os.environ[FAULT_ENV] = f"checkpoint.{kill[0]}:{kill[1]}"
            model = new_model()
            config = TrainConfig(checkpoint_dir=str(ckpt), **TRAIN)
            result = Trainer(model, config, callbacks=callbacks).fit(*SPLITS)
            if out is not None:
                save_file(model.state_dict(), str(out / "weights.safetensors"))
                summary = {"best_step": result.best_step, "history": result.history, "hits": fault_hits()}
                (out / "result.json").write_text(json.dumps(summary))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its weights, best step, history, and how often it reached each fault point."""
    out = tmp_path_factory.mktemp("reference")
    assert train(out / "ckpt", out) == 0
    summary = json.loads((out / "result.json").read_text())
    summary["weights"] = load_file(str(out / "weights.safetensors"))
    return summary


def resume_and_compare(ckpt: Path, out: Path, reference: dict) -> None:
    out.mkdir(exist_ok=True)
    assert train(ckpt, out) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["best_step"] == reference["best_step"]
    assert summary["history"] == reference["history"]  # every loss and metric, exactly
    weights = load_file(str(out / "weights.safetensors"))
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert torch.equal(weights[name], tensor), f"{name} differs after the resume"
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == ["step-000000018", "step-000000020"]  # the last two complete ones, nothing half-written


def test_the_reference_run_reaches_every_fault_point_of_every_write(reference):
    hits = reference["hits"]
    assert {f"checkpoint.{label}": hits[f"checkpoint.{label}"] for label in EVERY_WRITE} == {
        f"checkpoint.{label}": 7 for label in EVERY_WRITE
    }
    assert hits["checkpoint.prune"] == hits["checkpoint.pruned"] == 5  # from the third write on, one each
    assert "checkpoint.sweep" not in hits  # nothing was left to sweep


@pytest.mark.parametrize(
    "kill",
    [(label, 3) for label in EVERY_WRITE]  # the third write: two complete checkpoints before it, one pruned
    + [("prune", 1), ("pruned", 1), ("rename", 1), ("mkdir", 7), ("pruned", 5)],  # the first and last writes
    ids=lambda kill: f"{kill[0]}:{kill[1]}",
)
def test_a_kill_at_each_checkpoint_file_boundary_resumes_to_the_uninterrupted_weights(kill, reference, tmp_path):
    assert train(tmp_path / "ckpt", kill=kill) == -signal.SIGKILL
    resume_and_compare(tmp_path / "ckpt", tmp_path / "out", reference)


def test_a_kill_while_sweeping_a_killed_write_resumes_to_the_uninterrupted_weights(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert train(ckpt, kill=("file.optimizer.safetensors", 4)) == -signal.SIGKILL
    assert "step-000000012.partial" in {p.name for p in ckpt.iterdir()}
    assert train(ckpt, kill=("sweep", 1)) == -signal.SIGKILL  # the resume, killed as it deletes the leftover
    resume_and_compare(ckpt, tmp_path / "out", reference)


def random_moments(reference: dict, count: int, seed: int) -> list[list[tuple[str, int]]]:
    """``count`` seeded picks among every moment of the uninterrupted run (each step, each fault point's every
    occurrence); every other pick also kills the resume, at a boundary of its first checkpoint write."""
    moments = [("step", k) for k in range(1, reference["history"][-1]["step"] + 1)]
    moments += [
        (label.removeprefix("checkpoint."), n) for label, c in reference["hits"].items() for n in range(1, c + 1)
    ]
    rng = random.Random(seed)
    picks = rng.sample(sorted(moments), count)
    return [[pick, (rng.choice(EVERY_WRITE), 1)] if i % 2 else [pick] for i, pick in enumerate(picks)]


@pytest.mark.parametrize("case", range(20))
def test_a_kill_at_a_random_moment_resumes_to_the_uninterrupted_weights(case, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    kills = random_moments(reference, 20, seed=10)[case]
    assert train(ckpt, kill=kills[0]) == -signal.SIGKILL, kills
    for kill in kills[1:]:  # the resume's own write may not come: the run may have been a step from its end
        assert train(ckpt, kill=kill) in (0, -signal.SIGKILL)
    resume_and_compare(ckpt, tmp_path / "out", reference)


def test_the_cli_run_killed_mid_checkpoint_resumes_exactly(tmp_path):
    """``mtrank train`` in a fresh interpreter, killed between the files of its third checkpoint write, run again:
    the model directory holds the weights of an uninterrupted run (trained in this process)."""
    import yaml

    from mtrank.config.experiment import load_experiment
    from mtrank.pipeline import fit

    make_frame(n=300).to_csv(tmp_path / "rows.csv", index=False)
    train_section = {"epochs": 2, "eval_every": 2, "batch_size": 64, "progress": False}
    train_section["checkpoint_dir"] = str(tmp_path / "ckpt")  # 4 writes, at steps 2, 4, 6, 8
    (tmp_path / "exp.yaml").write_text(
        yaml.safe_dump(experiment_config(data={"train": "rows.csv"}, train=train_section))
    )
    command = [sys.executable, "-m", "mtrank.cli", "train", str(tmp_path / "exp.yaml"), "--threads", "1"]
    command += ["--out", str(tmp_path / "model"), "--no-progress"]
    env = {**os.environ, FAULT_ENV: "checkpoint.file.optimizer.safetensors:3", "PYTHONPATH": "src"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "model" / "model.safetensors").exists()
    env.pop(FAULT_ENV)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert resumed.returncode == 0, resumed.stderr
    config = load_experiment(tmp_path / "exp.yaml", {"train.checkpoint_dir": ""})
    expected = fit(config, output=None).model.state_dict()
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
