"""Big tables through ``mtrank train``: ``train.sparse`` (row-wise Adagrad / lazy Adam on the embedding table,
Adam on the rest), ``model.inputs.table_dtype`` (bf16 / fp16 storage), ``features.hash_buckets`` (with the
collision rate reported), the memory planner's refusal before anything is built, exact resume, and export and
serving of such a model."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtrank.artifacts import open_model_dir
from mtrank.cli import main
from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, experiment_from_dict
from mtrank.data.encoders import FeatureEncoder, stable_hash
from mtrank.data.tensors import TensorData
from mtrank.export.model_dir import export_model_dir
from mtrank.model import TABLE_DTYPES, MultiTaskModel
from mtrank.nn.embedding import expected_collision_rate
from mtrank.pipeline import fit
from mtrank.serve.schemas import ScoreRequest
from mtrank.serve.service import ScoringService
from mtrank.train import Ensemble, Trainer
from mtrank.train.cuda_graph import cuda_graph_plan
from mtrank.train.optim import DenseAndSparse, RowwiseAdagrad, clip_gradients
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401
from test_tabular_streaming import stream_config, write_shards

REPO = Path(__file__).resolve().parents[1]
SPARSE = {"optimizer": "rowwise_adagrad", "lr": 0.05}


def tiny_model(vocab_sizes=(40, 12), seed=0, table_dtype="fp32") -> MultiTaskModel:
    tasks = [TaskConfig("click", "binary"), TaskConfig("buy", "binary")]
    inputs = {"num_dense": 3, "vocab_sizes": list(vocab_sizes), "embedding_dim": 4, "table_dtype": table_dtype}
    return MultiTaskModel(ModelConfig(inputs=inputs, tasks=tasks, experts={"hidden": [8]}), seed=seed)


def tiny_data(n=256, seed=0, first_vocab=10) -> TensorData:
    """Rows whose first feature uses only ids ``[0, first_vocab)``; labels follow the ids."""
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, first_vocab, (n,), generator=g), torch.randint(0, 12, (n,), generator=g)], 1)
    dense = torch.randn(n, 3, generator=g)
    click = ((sparse[:, 0] % 2 == 0) ^ (torch.rand(n, generator=g) < 0.1)).float()
    buy = click * (dense[:, 0] > 0).float()
    return TensorData(dense, sparse, torch.stack([click, buy], 1))


def write_experiment(tmp_path: Path, **sections) -> Path:
    make_frame(n=400).to_csv(tmp_path / "rows.csv", index=False)
    raw = config(data={"train": "rows.csv"}, **sections)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cli(capsys, path: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["train", str(path), "--out", str(out), "--no-progress", "--no-baseline", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- mtrank train -------------------------------------------------------------------------------------------------


def test_mtrank_train_with_rowwise_adagrad_lowers_the_loss_and_touches_only_the_rows_of_its_ids(tmp_path, capsys):
    features = config()["features"]
    features["categorical"] = ["city", {"name": "user", "hash_buckets": 1000}]  # 50 users in 1,000 rows
    path = write_experiment(tmp_path, features=features, train={"epochs": 8, "eval_every": 10, "sparse": SPARSE})
    code, out, err = train_cli(capsys, path, tmp_path / "m")
    assert code == 0, err
    history = json.loads((tmp_path / "m" / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    assert "training step: eager (device is cpu" in out
    trained = open_model_dir(tmp_path / "m").model
    assert trained.embedding.table.weight.dtype == torch.float32 and not trained.embedding.table.sparse
    initial = MultiTaskModel(trained.config, seed=0).embedding.table.weight  # train.seed 0 built it
    changed = (trained.embedding.table.weight != initial).any(1).nonzero().flatten()
    users = stable_hash(pa.array(make_frame(n=400)["user"].astype(str).unique()), 1000) + 5  # after city's 5 rows
    assert 0 < len(changed) <= 5 + 50 and set(changed.tolist()) <= set(range(5)) | set(users.tolist())


def test_a_sparse_step_gives_the_table_a_gradient_of_the_batch_rows_only():
    model, data = tiny_model(), tiny_data(n=128, first_vocab=10)
    before = model.embedding.table.weight.detach().clone()
    cfg = TrainConfig(steps=1, batch_size=128, progress=False, sparse=SPARSE)
    trainer = Trainer(model, cfg)
    trainer.fit(data)
    assert isinstance(trainer.optimizer, DenseAndSparse) and isinstance(trainer.optimizer.sparse, RowwiseAdagrad)
    table = model.embedding.table.weight
    grad = table.grad.coalesce()
    batch_rows = torch.unique(torch.cat([data.sparse[:, 0], data.sparse[:, 1] + 40]))
    assert grad.is_sparse and torch.equal(grad.indices()[0], batch_rows)
    changed = (table.detach() != before).any(1).nonzero().flatten()
    assert torch.equal(changed, batch_rows)  # rows 10..39 of the first feature were never read or written
    accumulator = trainer.optimizer.sparse.state[table]["sum"]
    assert torch.equal(accumulator.nonzero().flatten(), batch_rows)


@pytest.mark.parametrize("table_dtype", ["bf16", "fp16"])
def test_a_half_precision_table_trains_in_its_dtype_and_ends_near_the_fp32_table(table_dtype):
    data = tiny_data(n=256)
    finals = {}
    for dtype in ("fp32", table_dtype):
        model = tiny_model(table_dtype=dtype)
        cfg = TrainConfig(epochs=3, batch_size=64, lr=0.01, progress=False, sparse=SPARSE)
        result = Trainer(model, cfg).fit(data, data)
        finals[dtype] = (model.embedding.table.weight.detach().float(), result.history[-1]["train_loss"])
        assert model.embedding.table.weight.dtype == TABLE_DTYPES[dtype]
        assert model.dtype == torch.float32  # the table is storage; the model computes in float32
    assert (finals[table_dtype][0] - finals["fp32"][0]).abs().max() < 0.05
    assert abs(finals[table_dtype][1] - finals["fp32"][1]) < 0.02


def test_the_encoder_measures_the_collision_rate_of_the_distinct_training_values():
    values = pa.table({"item": [f"item-{i}" for i in range(2000)] * 2})  # 2,000 distinct values, each twice
    encoder = FeatureEncoder(FeaturesSpec(categorical=[CategoricalFeature("item", hash_buckets=2000)])).fit(values)
    ids = stable_hash(pa.array([f"item-{i}" for i in range(2000)]), 2000)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    hashing = encoder.hashing()["item"]
    assert hashing == {"distinct": 2000, "buckets": 2000, "collision_rate": float((counts[inverse] > 1).mean())}
    assert abs(hashing["collision_rate"] - expected_collision_rate(2000, 2000)) < 0.03  # ~0.63 for n = m


def test_global_hash_buckets_hash_every_feature_without_its_own_and_mtrank_train_reports_the_collisions(
    tmp_path, capsys
):
    features = config()["features"]
    features["categorical"] = ["user", {"name": "city", "hash_buckets": 0}]  # city keeps its vocabulary
    path = write_experiment(tmp_path, features={**features, "hash_buckets": 16}, train={"epochs": 1})
    code, out, err = train_cli(capsys, path, tmp_path / "m")
    assert code == 0, err
    assert open_model_dir(tmp_path / "m").model.vocab_sizes == [16, 5]  # user: 16 hashed ids; city: 4 + OOV
    hashing = json.loads((tmp_path / "m" / "metrics.json").read_text())["hashing"]
    assert set(hashing) == {"user"} and hashing["user"]["buckets"] == 16 and hashing["user"]["distinct"] == 50
    assert hashing["user"]["collision_rate"] > 0.9  # 50 users in 16 ids
    share = f"{100 * hashing['user']['collision_rate']:.1f}% share their id with another"
    assert f"hashed features: user: 16 buckets, 50 distinct training values, {share}" in out
    assert (
        f"Hashed features: user: 16 buckets, 50 distinct training values, {share}"
        in (tmp_path / "m" / "report.md").read_text()
    )


def test_a_table_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, capsys):
    path = write_experiment(tmp_path, features={"hash_buckets": 10**11}, train={"epochs": 1})
    code, out, err = train_cli(capsys, path, tmp_path / "m")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(
        r"table (city|user): 100000M x 4 x float32 \+ adam state: plan [0-9.e+]+ GB > [0-9.]+ GB free", err
    )
    assert "train.sparse: rowwise_adagrad" in err and "model.inputs.table_dtype: bf16" in err
    assert not (tmp_path / "m").exists()


# --- checkpoints, export, serving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", ["rowwise_adagrad", "lazy_adam"])
def test_a_resumed_sparse_run_writes_the_bytes_of_an_uninterrupted_one(tmp_path, sparse):
    data, valid = tiny_data(n=256, seed=1), tiny_data(n=64, seed=2)

    def run(directory: Path, steps: int) -> None:
        cfg = TrainConfig(
            steps=steps, eval_every=4, batch_size=32, progress=False, checkpoint_dir=str(directory), grad_clip=1.0,
            sparse={"optimizer": sparse, "lr": 0.05},
        )  # fmt: skip
        Trainer(tiny_model(table_dtype="bf16"), cfg).fit(data, valid)  # bf16: stochastic rounding draws too

    run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    run(tmp_path / "resumed", 8)
    for name in ("weights.safetensors", "optimizer.safetensors"):
        straight = (tmp_path / "straight" / "step-000000008" / name).read_bytes()
        assert (tmp_path / "resumed" / "step-000000008" / name).read_bytes() == straight, name
    state = load_file(str(tmp_path / "resumed" / "step-000000008" / "optimizer.safetensors"))
    assert any(k.endswith(".sum" if sparse == "rowwise_adagrad" else ".exp_avg") for k in state)
    resumed = json.loads((tmp_path / "resumed" / "step-000000008" / "trainer_state.json").read_text())
    assert resumed["identity"]["train"]["sparse"]["optimizer"] == sparse


def test_a_streamed_sparse_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    frame = make_frame(n=300)
    train = write_shards(tmp_path / "train", frame.iloc[:240])
    frame.iloc[240:].to_csv(tmp_path / "valid.csv", index=False)

    def run(steps, ckpt=None, out="m"):
        extra = {"checkpoint_dir": str(ckpt)} if ckpt else {}
        cfg = stream_config(train, tmp_path / "valid.csv", steps=steps, batch_size=32, eval_every=4, **extra)
        cfg.train.sparse.optimizer, cfg.model.inputs.table_dtype = "rowwise_adagrad", "bf16"  # + stochastic rounding
        return fit(cfg, output=tmp_path / out, baseline=False)

    full = run(20, out="full")
    run(11, tmp_path / "ckpt", out="part")  # stops in epoch 1, after its 3rd batch
    resumed = run(20, tmp_path / "ckpt", out="resumed")
    assert resumed.train_result.resumed_from == 11 and resumed.step.startswith("eager")
    assert resumed.model.embedding.table.weight.dtype == torch.bfloat16
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    make_frame(n=400).to_csv(tmp / "rows.csv", index=False)
    raw = config(
        data={"train": str(tmp / "rows.csv")},
        model={**config()["model"], "inputs": {"embedding_dim": 4, "table_dtype": "bf16"}},
        train={"epochs": 2, "sparse": SPARSE},
    )
    fit(raw, output=tmp / "m", baseline=False)
    return tmp / "m"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_bf16_sparse_trained_model_exports_with_the_scores_of_eager(bf16_model_dir, fmt):
    loaded = open_model_dir(bf16_model_dir)
    assert loaded.model.embedding.table.weight.dtype == torch.bfloat16
    record = export_model_dir(bf16_model_dir, fmt, out=bf16_model_dir.parent / f"export-{fmt}")
    assert record["max_abs_diff_vs_eager"] <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
def test_the_service_scores_a_bf16_sparse_trained_model_as_eager(bf16_model_dir, backend):
    service = ScoringService(bf16_model_dir, backend)
    frame = make_frame(n=20, seed=3)
    candidates = frame[["user", "city", "age", "price", "tags"]].to_dict("records")
    response = service.score(ScoreRequest(candidates=candidates))
    dense, sparse = service.encode({}, candidates)
    model = open_model_dir(bf16_model_dir).model
    expected = model.predict(torch.as_tensor(dense), torch.as_tensor(sparse))
    got = torch.tensor([[s[t] for t in response.tasks] for s in response.scores])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- what the sparse path handles, and what it refuses ------------------------------------------------------------


def test_clipping_a_sparse_gradient_clips_as_the_dense_gradient_would():
    model, data = tiny_model(), tiny_data(n=64)
    grads = {}
    for sparse in (True, False):
        model.zero_grad(set_to_none=True)
        model.sparse_gradients(sparse)
        out = model(data.dense, data.sparse).task_logits
        (out.pow(2).sum() * 100).backward()
        clip_gradients(list(model.parameters()), 0.5)
        grads[sparse] = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[True]]))
    assert abs(float(norm) - 0.5) < 1e-4
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_cuda_graph_plan_graphs_rowwise_adagrad_and_names_lazy_adam_as_why_the_step_is_eager():
    possible, _ = cuda_graph_plan([], [], TrainConfig(sparse="rowwise_adagrad").validate(), torch.device("cuda"))
    assert possible
    possible, reason = cuda_graph_plan([], [], TrainConfig(sparse="lazy_adam").validate(), torch.device("cuda"))
    assert not possible and reason.startswith("train.sparse.optimizer='lazy_adam'")


@pytest.mark.parametrize("sparse", ["lazy_adam", {"optimizer": "dense", "lr": 0.1}])
def test_an_ensemble_refuses_sparse_tables_and_a_table_lr_in_one_line(sparse):
    ensemble = Ensemble(tiny_model().config, [0, 1])
    with pytest.raises(ValueError, match=r"^train.sparse \(optimizer '\w+', lr [\d.]+\): an ensemble's R stacked"):
        ensemble.fit(tiny_data(), None, TrainConfig(steps=1, progress=False, sparse=sparse))


@pytest.mark.parametrize("balancing", ["pcgrad", {"type": "fixed", "conflict_every": 5}])
def test_per_task_gradient_methods_with_sparse_tables_are_a_config_error(balancing):
    raw = config(train={"sparse": "rowwise_adagrad", "balancing": balancing})
    with pytest.raises(ConfigError, match=r"^train.sparse: 'rowwise_adagrad' gives the table sparse gradients"):
        experiment_from_dict(raw)


def test_sparse_keys_are_type_checked_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"train.sparse.optimizer: unknown 'adagrad'; did you mean 'rowwise_adagrad'"):
        experiment_from_dict(config(train={"sparse": "adagrad"}))
    with pytest.raises(ConfigError, match=r"train.sparse.lr: must be >= 0"):
        experiment_from_dict(config(train={"sparse": {"optimizer": "lazy_adam", "lr": -1}}))
    with pytest.raises(
        ConfigError, match=r"model.inputs.table_dtype: unknown 'int8'; expected one of \['fp32', 'bf16', 'fp16'\]"
    ):
        experiment_from_dict(config(model={"inputs": {"table_dtype": "int8"}}))
    with pytest.raises(ConfigError, match=r"features.hash_buckets: must be >= 0, got -3"):
        experiment_from_dict(config(features={**config()["features"], "hash_buckets": -3}))


def test_the_docs_big_table_snippet_trains_through_the_pipeline():
    text = (REPO / "docs" / "benchmarks.md").read_text()
    snippet = re.search(r"<!-- big-table-config -->\n```yaml\n(.*?)```", text, re.S)
    assert snippet is not None, "docs/benchmarks.md lost its big-table config snippet"
    raw = yaml.safe_load(snippet.group(1))
    features = {**config()["features"], **raw.pop("features")}
    sections = {k: {**config()[k], **v} for k, v in raw.items()}
    sections["train"].update(epochs=1, progress=False)
    result = fit(config(features=features, **sections), make_frame(n=400), output=None)
    assert result.model.embedding.table.weight.dtype == torch.bfloat16 and result.hashing
    assert result.step.startswith("eager")


def _fit_tiny(sparse) -> tuple[Trainer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=6, batch_size=32, lr=0.01, progress=False, sparse=sparse, schedule="cosine")
    trainer = Trainer(tiny_model(), cfg)
    trainer.fit(tiny_data())
    return trainer, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_dense_table_with_its_own_lr_is_an_adam_group_of_its_own():
    """``sparse: {optimizer: dense, lr: X}``: the tables keep Adam (dense gradients) at lr X, the rest at train.lr;
    X = train.lr is the default run exactly, and a tiny X leaves the table where it started."""
    start = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    _, default = _fit_tiny("dense")
    trainer, same = _fit_tiny({"optimizer": "dense", "lr": 0.01})
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [len(list(trainer.model.parameters())) - 1, 1]
    for name in default:
        assert torch.equal(same[name], default[name]), name
    trainer, frozen = _fit_tiny({"optimizer": "dense", "lr": 1e-9})
    table = next(name for name in frozen if "table" in name)
    assert not trainer.model.embedding_tables()[0].grad.is_sparse
    assert (frozen[table] - start[table]).abs().max() < 1e-6
    assert not torch.allclose(frozen[table], default[table], atol=1e-4)
    moved = [name for name in frozen if name != table and not torch.equal(frozen[name], start[name])]
    assert "block.towers.layers.0.weight" in moved  # the rest trains at train.lr
