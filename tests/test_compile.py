"""``train.compile``: the step's forward + loss under ``torch.compile`` trains as the eager step does.

Compile time dominates these tests, so the model is tiny and most tests use the ``aot_eager`` backend (Dynamo +
AOTAutograd, eager kernels: the tracing and the compiled backward without inductor's code generation); one
tests run inductor (C++ kernels on CPU). Tolerances: ``aot_eager`` runs the eager kernels, so it is held to
float32 rounding (1e-6); inductor fuses and reorders reductions, so after a few Adam steps its losses and
weights are held to rtol 1e-4, atol 1e-5.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch._dynamo.utils import counters

from mtrank.artifacts import load_model, save_model
from mtrank.cli import main
from mtrank.config import CompileConfig, ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.data import TensorData, make_synthetic
from mtrank.evaluate import evaluate
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.distributed import shutdown
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.step import TrainStep
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401

TASKS = [TaskConfig("ctr", "binary"), TaskConfig("watch", "regression")]
ROWS, BATCH = 300, 64  # 4 full batches and a short one of 44 rows per epoch
EXACT = {"rtol": 1e-6, "atol": 1e-6}  # aot_eager: the eager kernels
FUSED = {"rtol": 1e-4, "atol": 1e-5}  # inductor: fused kernels, reordered reductions


def tiny_config(hidden=16, **extra) -> ModelConfig:
    return ModelConfig(
        inputs={"num_dense": 100, "vocab_sizes": [20, 8], "embedding_dim": 4},
        tasks=TASKS,
        block={"type": "mmoe", "num_experts": 3},
        experts={"hidden": [hidden]},
        towers={"hidden": [8]},
        **extra,
    )


def tiny_data(rows=ROWS, seed=0) -> TensorData:
    data = make_synthetic(n=rows, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, 20, (rows,), generator=gen), torch.randint(0, 8, (rows,), generator=gen)], 1)
    labels = torch.stack([(data.labels[:, 0] > 0).float(), data.labels[:, 1]], 1)
    return TensorData(data.dense, sparse, labels)


def train(compile, steps=10, model_config=None, **train):
    """A tiny model trained ``steps`` steps (eval every step: the history holds every step's loss)."""
    cfg = TrainConfig(steps=steps, batch_size=BATCH, eval_every=1, progress=False, compile=compile, **train)
    model = MultiTaskModel(model_config or tiny_config(), seed=0)
    trainer = Trainer(model, cfg)
    graphs = counters["stats"]["unique_graphs"]
    result = trainer.fit(tiny_data())
    if compile:  # Dynamo compiled the step (it did not fall back to running it eagerly)
        assert counters["stats"]["unique_graphs"] > graphs and trainer.loop.step.compiled_steps > 0
    return trainer, model, [h["train_loss"] for h in result.history]


def assert_same_training(eager, compiled, tolerance):
    (_, eager_model, eager_losses), (_, model, losses) = eager, compiled
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), **tolerance)
    for (name, value), expected in zip(model.state_dict().items(), eager_model.state_dict().values()):
        torch.testing.assert_close(value, expected, **tolerance, msg=name)


def test_inductor_steps_give_the_eager_losses_and_weights_and_a_short_batch_runs_eagerly():
    eager = train(False, grad_clip=1.0)
    trainer, _, _ = compiled = train(True, grad_clip=1.0)
    assert_same_training(eager, compiled, FUSED)
    assert trainer.step_path == "compiled"
    assert "backend inductor" in trainer.step_path_reason
    assert trainer.loop.step.compiled_steps == 8  # 10 steps: 2 short batches (steps 5 and 10) ran eagerly


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_aot_eager_steps_give_the_eager_losses_and_weights(precision):
    tolerance = EXACT if precision == "fp32" else {"rtol": 1e-3, "atol": 1e-4}  # bf16: casts may move
    assert_same_training(train(False, precision=precision), train("aot_eager", precision=precision), tolerance)


def test_a_whole_run_compiles_once_despite_short_batches_and_evaluation():
    before = counters["stats"]["unique_graphs"]
    trainer = Trainer(
        MultiTaskModel(tiny_config(), seed=0),
        TrainConfig(epochs=3, batch_size=BATCH, progress=False, compile="aot_eager"),
    )
    trainer.fit(tiny_data(), tiny_data(100, seed=1))  # 3 epochs, 3 short batches, 3 evaluations
    assert counters["stats"]["unique_graphs"] - before == 1
    assert trainer.loop.step.compiled_steps == 12


def test_each_of_many_models_in_one_process_runs_compiled():
    """Dynamo keeps at most 8 versions per code object, then runs the code eagerly without an error: every step
    compiles its own copy, so a tuning run of many architectures keeps compiling."""
    before = counters["stats"]["unique_graphs"]
    for hidden in range(4, 14):  # 10 architectures
        trainer, _, _ = train("aot_eager", steps=2, model_config=tiny_config(hidden))
        assert trainer.loop.step.compiled_steps == 2
    assert counters["stats"]["unique_graphs"] - before == 10


@pytest.mark.parametrize(
    "extra",
    [
        {"balancing": "pcgrad"},  # per-task gradients: backward through the compiled graph K + 1 times
        {"balancing": {"type": "gradnorm", "task_gradients": "batched"}},
        {"distill": "pointwise"},
    ],
    ids=["pcgrad", "gradnorm-batched", "distill"],
)
def test_balancers_sparse_tables_and_distillation_train_compiled_as_eager(extra):
    if "distill" in extra:
        data = tiny_data()
        teacher = torch.randn(len(data), 2, generator=torch.Generator().manual_seed(3))
        results = []
        for compile in (False, "aot_eager"):
            model = MultiTaskModel(tiny_config(), seed=0)
            cfg = TrainConfig(steps=6, batch_size=BATCH, eval_every=1, progress=False, compile=compile, **extra)
            history = Trainer(model, cfg).fit(data.with_teacher(teacher)).history
            results.append((None, model, [h["train_loss"] for h in history]))
        assert_same_training(*results, EXACT)
        return
    assert_same_training(train(False, steps=6, **extra), train("aot_eager", steps=6, **extra), EXACT)


def test_a_rowwise_adagrad_table_trains_under_inductor_as_eager():
    """The sparse lookup is left out of the compiled graph (a graph break): the rest compiles around it."""
    eager = train(False, steps=6, sparse="rowwise_adagrad")
    trainer, _, _ = compiled = train(True, steps=6, sparse="rowwise_adagrad")
    assert_same_training(eager, compiled, FUSED)
    assert trainer.step_path == "compiled"


def test_an_ensemble_trains_compiled_as_eager():
    data = EnsembleData.shared(tiny_data())
    states = []
    for compile in (False, "aot_eager"):
        ensemble = Ensemble(tiny_config(), init_seeds=[0, 1])
        cfg = TrainConfig(steps=6, batch_size=BATCH, progress=False, compile=compile, eval_every=10**9)
        ensemble.fit(data, None, cfg)
        states.append(ensemble.state_dict())
    assert ensemble.loop.step_path == "compiled" and ensemble.loop.step.compiled_steps == 5
    for name, value in states[1].items():
        torch.testing.assert_close(value, states[0][name], **EXACT, msg=name)


def test_a_compiled_run_saves_resumes_and_evaluates_like_an_uncompiled_one(tmp_path):
    """No ``_orig_mod.`` keys anywhere: the model is not wrapped, only the step's function is compiled."""
    uninterrupted = train(False, steps=8)
    for steps in (4, 8):  # stopped after 4 steps, then resumed to 8 from the checkpoint
        model = MultiTaskModel(tiny_config(), seed=0)
        cfg = TrainConfig(steps=steps, batch_size=BATCH, progress=False, compile="aot_eager")
        cfg.checkpoint_dir, cfg.eval_every = str(tmp_path / "ckpt"), 1
        trainer = Trainer(model, cfg)
        result = trainer.fit(tiny_data())
    assert trainer.step_path == "compiled" and result.resumed_from == 4
    checkpoint = next((tmp_path / "ckpt").rglob("*.safetensors"))
    from safetensors.torch import load_file

    assert not [key for key in load_file(checkpoint) if "_orig_mod" in key]
    assert list(model.state_dict()) == list(uninterrupted[1].state_dict())
    for (name, value), expected in zip(model.state_dict().items(), uninterrupted[1].state_dict().values()):
        torch.testing.assert_close(value, expected, **EXACT, msg=name)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    valid = tiny_data(100, seed=1)
    assert evaluate(loaded, valid) == pytest.approx(evaluate(model, valid))
    torch.testing.assert_close(loaded.predict(valid.dense, valid.sparse), model.predict(valid.dense, valid.sparse))


@pytest.mark.parametrize(
    "value, message",
    [
        ({"mode": "reduce-overhead"}, "train.compile.mode: 'reduce-overhead' uses inductor's own CUDA graphs"),
        ({"mode": "max-autotune"}, "train.compile.mode: 'max-autotune' uses inductor's own CUDA graphs"),
        ({"mode": "fast"}, "train.compile.mode: unknown 'fast'"),
        ({"backend": "aot_eager", "mode": "max-autotune-no-cudagraphs"}, "is an inductor mode, but backend is"),
        ("tvm", "train.compile.backend: unknown 'tvm'"),
        ({"dynamc": True}, "train.compile.dynamc: unknown field; did you mean 'dynamic'?"),
        ({"dynamic": "yes"}, "train.compile.dynamic: expected true or false"),
    ],
)
def test_a_bad_compile_section_is_a_one_line_error_naming_the_field(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        TrainConfig.from_dict({"compile": value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text, options",
    [
        ("false", None),
        ("true", CompileConfig()),
        ("aot_eager", CompileConfig(backend="aot_eager")),
        (
            "{backend: inductor, mode: max-autotune-no-cudagraphs, dynamic: true}",
            CompileConfig(mode="max-autotune-no-cudagraphs", dynamic=True),
        ),
    ],
)
def test_the_compile_section_round_trips_through_yaml(text, options):
    built = TrainConfig.from_dict(yaml.safe_load(f"compile: {text}"))
    assert built.compile_options == options
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(built.to_dict())))
    assert again == built and again.compile_options == options


def test_mtrank_train_with_set_train_compile_reports_the_compiled_step(tmp_path, capsys):
    make_frame(n=300).to_csv(tmp_path / "rows.csv", index=False)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config(data={"train": "rows.csv"}, train={"epochs": 1, "progress": False})))
    code = main(["train", str(path), "--out", str(tmp_path / "m"), "--set", "train.compile=aot_eager", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "training step: compiled (" in out and "backend aot_eager" in out
    assert not [k for k in load_model(tmp_path / "m").state_dict() if "_orig_mod" in k]


def test_a_train_step_built_by_hand_compiles_only_full_batches():
    model = MultiTaskModel(tiny_config(), seed=0)
    from mtrank.train.trainer import SingleRun

    runs = SingleRun(model, torch.device("cpu"))
    data = tiny_data()
    config = TrainConfig(compile="aot_eager").validate()
    step = TrainStep(runs, torch.optim.Adam(runs.parameters()), config, data.take, lambda key: len(key) == BATCH)
    step(torch.arange(BATCH))
    step(torch.arange(BATCH, BATCH + 10))  # a short batch
    assert step.compiled_steps == 1


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = MultiTaskModel(tiny_config(), seed=0)
    trainer = Trainer(model, TrainConfig(steps=4, batch_size=BATCH // 2, progress=False, compile="aot_eager"))
    trainer.fit(tiny_data())
    if rank == 0:
        torch.save({"state": model.state_dict(), "path": trainer.step_path}, out)
    shutdown()
    os._exit(0)  # as tests/test_distributed.py: no interpreter finalisation with Gloo threads alive


def test_two_rank_ddp_compiled_equals_one_process_with_twice_the_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    saved = torch.load(out)
    assert saved["path"] == "compiled"
    _, model, _ = train(False, steps=4)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_compile_benchmark_checks_and_times_w3_with_and_without_compile(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_step

    out = tmp_path / "compile.json"
    argv = ["--device", "cpu", "--check-steps", "2", "--check-batch-size", "64", "--rounds", "1", "--compile"]
    argv += ["aot_eager", "--workload", "W3", "--quick", "--batch-sizes", "64", "--json", str(out)]
    compile_step.main(argv)
    result = json.loads(out.read_text())
    for precision in ("fp32", "bf16"):
        check = result["check"][precision]["compiled"]
        assert check["step_path"] == "compiled" and check["max_loss_diff"] <= 1e-5
    speed = result["speed"]["64"]
    assert speed["uncompiled"]["step_path"] == "eager" and speed["uncompiled"]["compile"] is False
    assert speed["compiled"]["step_path"] == "compiled" and speed["compiled"]["compile"] == "aot_eager"
    assert speed["speedup"] > 0
