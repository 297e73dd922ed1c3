"""Numeric transforms (quantile normalisation, piecewise-linear and periodic embeddings) and regression label
transforms: each equals its reference, and each round-trips through the model directory, TorchScript, ONNX and
the scoring service with the scores of the trained model."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

import mtrank
from mtrank.artifacts import ModelDirError, open_model_dir, seal_model_dir
from mtrank.config import ConfigError, ModelConfig, TaskConfig
from mtrank.config.experiment import FeaturesSpec, TaskSpec, experiment_from_dict
from mtrank.data.encoders import FeatureEncoder, LabelTransforms, quantile_edges, target_edges
from mtrank.data.splits import encode_table, load_splits
from mtrank.export.model_dir import export_model_dir
from mtrank.export.onnx import OnnxScorer
from mtrank.export.torchscript import load_torchscript
from mtrank.model import MultiTaskModel
from mtrank.nn.embedding import PeriodicEmbedding, PiecewiseLinearEmbedding
from mtrank.pipeline import predict_model_dir
from mtrank.serve.schemas import ScoreRequest
from mtrank.serve.service import ScoringService
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


def frame_with_spend(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """The tabular test rows plus a heavy-tailed regression label ``spend`` in the thousands."""
    frame = make_frame(n, seed)
    rng = np.random.default_rng(seed + 1)
    frame["spend"] = np.exp(rng.normal(6.0, 1.2, n) + 0.02 * (frame["age"] - 40)).round(2)
    return frame


# ---------------------------------------------------------------------------------------------- references


def test_quantile_normalisation_equals_scikit_learns_quantile_transformer_ties_included():
    from sklearn.preprocessing import QuantileTransformer

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.exponential(3.0, 900), np.zeros(100)])  # 10% ties at 0
    frame = pd.DataFrame({"x": x})
    spec = FeaturesSpec.from_dict({"numeric": [{"name": "x", "quantile": True, "quantiles": 200}]}, "features")
    encoder = FeatureEncoder(spec).fit(frame)
    reference = QuantileTransformer(n_quantiles=200, output_distribution="normal", subsample=None).fit(x[:, None])
    probe = np.concatenate([x, [-1.0, 1e6]])  # beyond the training range too
    ours = encoder.transform(pd.DataFrame({"x": probe}))[0][:, 0]
    np.testing.assert_allclose(ours, reference.transform(probe[:, None])[:, 0], atol=2e-6)


def reference_ple(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """Gorishniy et al. 2022, eq. 1, bin by bin."""
    t = len(edges) - 1
    out = np.zeros((len(x), t))
    for i in range(t):
        e = (x - edges[i]) / (edges[i + 1] - edges[i])
        if i > 0:
            e = np.maximum(e, 0.0)
        if i < t - 1:
            e = np.minimum(e, 1.0)
        out[:, i] = e
    return out


def test_piecewise_linear_encoding_equals_the_papers_formula_bin_by_bin_with_padding():
    edges = [[-1.0, 0.0, 0.5, 2.0], [0.0, 3.0]]  # 3 bins and 1 bin (padded to 3)
    ple = PiecewiseLinearEmbedding([0, 2], edges, dim=4)
    dense = torch.tensor([[-3.0, 9.0, -1.0], [0.25, 9.0, 1.0], [1.0, 9.0, 4.0], [7.0, 9.0, 3.0]])
    encoded = ple.encode(dense).numpy()  # (B, F, T)
    np.testing.assert_allclose(encoded[:, 0], reference_ple(dense[:, 0].numpy(), edges[0]), atol=1e-6)
    np.testing.assert_allclose(encoded[:, 1, :1], reference_ple(dense[:, 2].numpy(), edges[1]), atol=1e-6)
    assert (encoded[:, 1, 1:] == 0).all()  # padding bins stay 0
    tokens = ple(dense)
    expected = torch.relu(torch.einsum("bt,td->bd", ple.encode(dense)[:, 0], ple.weight[0]) + ple.bias[0])
    torch.testing.assert_close(tokens[:, 0], expected)


def test_periodic_embedding_equals_a_loop_over_columns_and_its_padded_frequencies_stay_zero():
    torch.manual_seed(0)
    emb = PeriodicEmbedding([1, 0], [3, 5], [0.5, 2.0], dim=4)
    dense = torch.randn(6, 2)
    for f, column in enumerate([1, 0]):
        k = [3, 5][f]
        c = emb.frequencies[f, :k]
        angle = 2 * torch.pi * dense[:, column : column + 1] * c
        v = torch.cat([torch.sin(angle), torch.cos(angle)], 1)  # (B, 2k): the column's own frequencies only
        width = emb.frequencies.shape[1]
        weight = torch.cat([emb.weight[f, :k], emb.weight[f, width : width + k]])
        constant = emb.weight[f, width + k :].sum(0)  # cos(0) = 1 of the padded frequencies
        expected = torch.relu(v @ weight + constant + emb.bias[f])
        torch.testing.assert_close(emb(dense)[:, f], expected, atol=1e-5, rtol=1e-5)
    emb(dense).sum().backward()
    assert emb.frequencies.grad[0, 3:].abs().max() == 0  # no gradient reaches a padded frequency


def test_quantile_bins_hold_equal_shares_and_target_bins_find_the_labels_threshold():
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    edges = quantile_edges(z, 8)
    counts = np.histogram(z, edges)[0]
    assert len(edges) == 9 and counts.min() >= 490 and counts.max() <= 510
    labels = (z > 0.7).astype(float)[:, None]
    tree_edges = np.asarray(target_edges(z, labels, 4))
    assert np.abs(tree_edges - 0.7).min() < 0.05  # an edge where the label changes
    assert tree_edges[0] == z.min() and tree_edges[-1] == z.max()


def test_label_transforms_invert_exactly_and_the_model_inverts_as_the_numpy_transform():
    tasks = [
        TaskSpec("click"),
        TaskSpec("spend", type="regression", label_transform="log1p_standardize"),
        TaskSpec("dwell", type="regression", label_transform="standardize"),
        TaskSpec("delta", type="regression", label_transform="log1p"),
    ]
    rng = np.random.default_rng(0)
    labels = np.stack(
        [rng.integers(0, 2, 50), rng.exponential(2000, 50), rng.normal(300, 40, 50), rng.normal(0, 50, 50)], 1
    )
    transforms = LabelTransforms(tasks).fit(labels)
    z = transforms.transform(labels)
    assert abs(z[:, 1].mean()) < 1e-5 and abs(z[:, 1].std() - 1) < 1e-5  # standardised on the log scale
    np.testing.assert_allclose(transforms.inverse(z)[:, 1:], labels[:, 1:], rtol=1e-5)
    np.testing.assert_array_equal(z[:, 0], labels[:, 0])  # binary: untouched
    model_tasks = [t.task_config(transforms.task_stats().get(t.name)) for t in tasks]
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 1}, tasks=model_tasks))
    logits = torch.from_numpy(z).float()
    scores = model.scores(logits).double().numpy()
    np.testing.assert_allclose(scores[:, 1:], transforms.inverse(z)[:, 1:], rtol=2e-5)


# ---------------------------------------------------------------------------------------------- training


TRANSFORMS = {
    "quantile normalisation": ({"age": {"quantile": True}}, "none"),
    "ple, quantile bins": ({"age": {"embedding": {"type": "ple", "bins": 6}}}, "none"),
    "ple, target bins + log1p labels": (
        {"age": {"embedding": {"type": "ple", "bins": 5, "bin_method": "target"}}},
        "log1p",
    ),
    "periodic + standardised labels": (
        {"price": {"log1p": True, "embedding": {"type": "periodic", "frequencies": 4, "sigma": 0.5}}},
        "standardize",
    ),
    "all at once": (
        {
            "age": {"quantile": True, "embedding": "ple"},
            "price": {"log1p": True, "embedding": {"type": "periodic", "frequencies": 3}},
        },
        "log1p_standardize",
    ),
}


def transform_config(features: dict, label_transform: str) -> dict:
    numeric = [{"name": name, **features.get(name, {})} for name in ("age", "price")]
    return config(
        features={"numeric": numeric},
        tasks=[{"name": "click"}, {"name": "spend", "type": "regression", "label_transform": label_transform}],
        train={"epochs": 3},
    )


@pytest.fixture(scope="module", params=list(TRANSFORMS))
def trained(request, tmp_path_factory):
    features, label_transform = TRANSFORMS[request.param]
    directory = tmp_path_factory.mktemp("transform")
    frame = frame_with_spend()
    result = mtrank.fit(transform_config(features, label_transform), frame, output=directory, baseline=False)
    return result, directory, frame


def test_each_transform_scores_alike_from_memory_disk_torchscript_onnx_and_the_service(trained):
    result, directory, frame = trained
    rows = frame.head(40)
    dense, sparse = result.encoder.transform(rows)
    expected = result.model.predict(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    assert np.isfinite(expected).all()
    loaded = open_model_dir(directory)  # the model and the encoders through the one loader
    dense2, sparse2 = loaded.encoder.transform(rows)
    np.testing.assert_array_equal(dense2, dense)
    np.testing.assert_allclose(loaded.model.predict(torch.from_numpy(dense), torch.from_numpy(sparse)), expected)
    predicted = predict_model_dir(directory, rows, progress=False)
    np.testing.assert_allclose(predicted.column("score_spend").to_numpy(), expected[:, 1], rtol=1e-6)
    for fmt, load in (("torchscript", load_torchscript), ("onnx", OnnxScorer)):
        record = export_model_dir(directory, fmt)
        got = np.asarray(load(record["path"])(torch.from_numpy(dense), torch.from_numpy(sparse)))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    service = ScoringService(directory, "onnx")
    candidates = rows[["user", "city", "age", "price", "tags"]].to_dict("records")
    response = service.score(ScoreRequest(candidates=candidates))
    served = np.array([[s["click"], s["spend"]] for s in response.scores])
    np.testing.assert_allclose(served, expected, rtol=2e-5, atol=2e-5)


def test_regression_labels_are_learned_on_the_transformed_scale_and_reported_on_their_own(trained):
    result, directory, frame = trained
    kind = result.model.tasks[1].label_transform
    metrics = json.loads((directory / "metrics.json").read_text())["metrics"]["test"]
    experiment = open_model_dir(directory).require_experiment()
    table, source = load_splits(experiment, frame)["test"]
    encoded = encode_table(result.encoder, table, experiment, source)
    predictions = result.model.predict(encoded.dense, encoded.sparse)[:, 1].double().numpy()
    labels = encoded.labels[:, 1].double().numpy()
    assert labels.mean() > 300  # the labels' own scale
    assert metrics["mse/spend"] == pytest.approx(float(np.mean((predictions - labels) ** 2)), rel=1e-5)
    train_loss = result.train_result.history[-1]["train_loss/spend"]  # the loss the optimiser saw
    assert (train_loss > 1e4) == (kind == "none")  # squared thousands, or a log / standardised scale


def test_the_report_names_the_transformed_labels(trained):
    result, directory, _ = trained
    kind = result.model.tasks[1].label_transform
    report = (directory / "report.md").read_text()
    assert (f"`spend` ({kind})" in report) == (kind != "none")


@pytest.mark.parametrize("mixer", [0, 1])
def test_numeric_tokens_export_to_torchscript_and_onnx_with_and_without_the_feature_mixer(tmp_path, mixer):
    from mtrank.artifacts import save_model

    numeric = [
        {"column": 0, "type": "ple", "edges": [-1.0, 0.0, 1.5]},
        {"column": 2, "type": "periodic", "frequencies": 3},
        {"column": 3, "type": "ple", "edges": [-2.0, -1.0, 0.0, 1.0, 2.0]},
    ]
    tasks = [TaskConfig("click"), TaskConfig("spend", "regression", 1.0, "log1p_standardize", 5.0, 1.5)]
    model_config = ModelConfig(
        inputs={"num_dense": 4, "vocab_sizes": [7, 5], "embedding_dim": 4, "numeric": numeric},
        tasks=tasks,
        mixer={"layers": mixer},
    )
    model = MultiTaskModel(model_config)
    assert model.embedding.num_tokens == 5 and model.embedding.num_plain == 1
    save_model(model, tmp_path)
    for fmt in ("torchscript", "onnx"):
        assert export_model_dir(tmp_path, fmt)["max_abs_diff_vs_eager"] <= 1e-5


# ---------------------------------------------------------------------------------------------- config and files


def test_a_model_directory_whose_encoders_have_other_bins_is_refused(tmp_path):
    features, label_transform = TRANSFORMS["ple, quantile bins"]
    mtrank.fit(transform_config(features, label_transform), frame_with_spend(300), output=tmp_path, baseline=False)
    path = tmp_path / "encoders.json"
    data = json.loads(path.read_text())
    data["state"]["age"]["edges"][1] += 0.01
    path.write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="encoders.json: .* manifest.json says"):  # the seal catches it first
        open_model_dir(tmp_path)
    seal_model_dir(tmp_path)  # sealed again after the change: the bins still disagree with the model's
    with pytest.raises(ModelDirError, match="embedded numeric features .* are not the model's"):
        open_model_dir(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["tasks"][0].update(label_transform="standardize"),
            "tasks\\[0\\].label_transform: 'standardize' is for regression tasks",
        ),
        (
            lambda c: c["features"]["numeric"][0].update(embedding={"type": "ple", "bins": 1}),
            "embedding.bins: must be >= 2",
        ),
        (
            lambda c: c["features"]["numeric"][0].update(embedding="pl"),
            "embedding.type: unknown 'pl'; did you mean 'ple'",
        ),
        (lambda c: c["features"]["numeric"][0].update(quantiles=1), "numeric\\[0\\].quantiles: must be >= 2"),
    ],
)
def test_bad_transform_settings_fail_naming_the_field(change, message):
    cfg = transform_config({}, "none")
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(cfg)


def test_a_model_config_checks_its_embedded_columns():
    with pytest.raises(ConfigError, match="inputs.numeric\\[0\\].column: dense column 3 does not exist"):
        ModelConfig(inputs={"num_dense": 2, "numeric": [{"column": 3, "edges": [0, 1]}]}).validate()
    with pytest.raises(ConfigError, match="numeric\\[0\\].edges: expected >= 2 finite, strictly ascending"):
        ModelConfig(inputs={"num_dense": 2, "numeric": [{"column": 0, "edges": [1, 1]}]}).validate()
    with pytest.raises(ConfigError, match="tasks\\[0\\].label_transform: 'log1p' is for regression tasks"):
        ModelConfig(inputs={"num_dense": 2}, tasks=[TaskConfig("a", label_transform="log1p")]).validate()


def test_a_model_without_the_new_inputs_has_the_weights_it_always_had():
    """Model directories written before numeric embeddings and label transforms still load: their models hold
    no new buffer."""
    tasks = [TaskConfig("click"), TaskConfig("spend", "regression")]
    names = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [4]}, tasks=tasks)).state_dict()
    assert not [n for n in names if "plain_columns" in n or n.startswith("label_") or "numeric_embeddings" in n]
    assert "label_inverse" not in str(list(names))
    scaled = [TaskConfig("click"), TaskConfig("spend", "regression", 1.0, "standardize", 3.0, 2.0)]
    numeric = [{"column": 0, "edges": [0.0, 1.0]}]
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [4], "numeric": numeric}, tasks=scaled))
    assert {"label_inverse.scale", "label_inverse.shift", "embedding.plain_columns"} <= set(model.state_dict())


ZOO_WITH_NUMERIC = {
    "stem": {"block": {"type": "stem", "num_experts": 2, "task_experts": 1}},
    "pepnet": {"block": "shared_bottom", "pepnet": {"epnet": ["scenario"], "ppnet": ["user"], "hidden": 6}},
    "adatt": {"block": {"type": "adatt", "num_experts": 2, "task_experts": 1}},
    "home": {"block": {"type": "home", "num_experts": 2, "task_experts": 1}},
}


def zoo_numeric_model(extra: dict) -> MultiTaskModel:
    numeric = [
        {"column": 0, "type": "ple", "edges": [-1.0, 0.0, 1.5]},
        {"column": 2, "type": "periodic", "frequencies": 3},
    ]
    tasks = [TaskConfig("click"), TaskConfig("spend", "regression", 1.0, "standardize", 5.0, 1.5)]
    inputs = {"num_dense": 3, "vocab_sizes": [7, 5], "embedding_dim": 4, "numeric": numeric}
    config = ModelConfig.from_dict(
        {"inputs": {**inputs, "names": ["user", "scenario"]}, "experts": {"hidden": [6]}, **extra}
    )
    return MultiTaskModel(dataclasses.replace(config, tasks=tasks)).eval()


@pytest.mark.parametrize("zoo", list(ZOO_WITH_NUMERIC))
def test_numeric_tokens_reach_the_zoos_blocks_and_export(tmp_path, zoo):
    from mtrank.artifacts import save_model

    model = zoo_numeric_model(ZOO_WITH_NUMERIC[zoo])
    torch.manual_seed(0)
    dense, sparse = torch.randn(6, 3), torch.stack([torch.randint(0, 7, (6,)), torch.randint(0, 5, (6,))], 1)
    x, _ = model.block_input(dense, sparse)
    tokens = model.embedding.tokens(dense, sparse)  # (B, 2 numeric + 2 categorical, tables * D)
    assert tokens.shape[1] == 4 and x.shape[-1] == 1 + 4 * 4  # the plain column 1, then 4 tokens of D = 4
    if zoo == "stem":  # task t's input: the plain column, then the t-th D-wide slice of every token
        for t in range(3):
            expected = torch.cat([dense[:, 1:2], tokens[..., t * 4 : (t + 1) * 4].flatten(1)], 1)
            torch.testing.assert_close(x[t], expected)
    if zoo == "pepnet":  # the gates read the categorical tokens, after the two numeric ones
        assert model.epnet.domain_tokens.tolist() == [3] and model.ppnet.prior_tokens.tolist() == [2]
    save_model(model, tmp_path)
    for fmt in ("torchscript", "onnx"):
        assert export_model_dir(tmp_path, fmt)["max_abs_diff_vs_eager"] <= 1e-5
