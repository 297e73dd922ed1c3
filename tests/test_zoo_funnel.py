"""ESMM, ESCM2 (IPS, DR) and AITM against the papers' equations and the public reference code's facts.

* ESMM (Ma et al., SIGIR 2018, eq. 3-4): ``L = BCE(pCTR, y_click) + BCE(pCTR pCVR, y_click y_buy)``.
* ESCM2 (Wang et al., SIGIR 2022), PaddleRec ``models/multitask/escm2`` (``dygraph_model.py``): per row,
  IPS ``o * logloss(pCVR, buy) * min(1 / max(pCTR, 1e-6), 15)`` with the inverse propensity held constant;
  DR ``e_hat + o (e - e_hat) / pCTR + o (e - e_hat)^2 / pCTR``; cost ``L_CTR + w_c R + w_g L_CTCVR``.
* AITM (Xi et al., KDD 2021), the authors' ``AITM.py``: ``info = relu(Dense(q_click))``, attention over
  ``[q_purchase, info]`` with bias-free Q, K, V and ``/ sqrt(K)``, ``purchase = sigmoid(Dense(ait))``,
  loss ``logloss(click) + logloss(purchase) + 0.6 mean(max(purchase - click, 0))``.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import log_loss, roc_auc_score

import mtrank
from mtrank.config import ConfigError, ModelConfig, TrainConfig
from mtrank.config.experiment import experiment_from_dict
from mtrank.data.readers import encode_labels, read_table
from mtrank.data.synthetic import make_funnel
from mtrank.evaluate.metrics import task_metrics
from mtrank.export.common import max_difference
from mtrank.export.onnx import OnnxScorer, export_onnx
from mtrank.export.torchscript import export_torchscript, load_torchscript
from mtrank.model import MultiTaskModel, ScoringModule
from mtrank.serve.schemas import ScoreRequest
from mtrank.serve.service import ScoringService
from mtrank.train import Trainer
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.losses import FunnelSpec, funnel_loss, multitask_loss
from tabular_helpers import one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TASKS = [{"name": "ctr"}, {"name": "cvr", "depends_on": "ctr"}]


def funnel_model(funnel: dict, block: str = "shared_bottom", **extra) -> MultiTaskModel:
    config = {
        "inputs": {"num_dense": 3, "vocab_sizes": [5, 4], "embedding_dim": 2},
        "tasks": TASKS,
        "block": block,
        "experts": {"hidden": [6]},
        "towers": {"hidden": [4]},
        "funnel": funnel,
        **extra,
    }
    return MultiTaskModel(ModelConfig.from_dict(config), seed=3)


def funnel_batch(rows: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, 3, generator=gen)
    sparse = torch.stack([torch.randint(0, 5, (rows,), generator=gen), torch.randint(0, 4, (rows,), generator=gen)], 1)
    click = (torch.arange(rows) % 2).float()  # half the rows clicked
    buy = torch.where(click == 1, (torch.arange(rows) % 4 == 1).float(), torch.full((rows,), math.nan))
    return dense, sparse, torch.stack([click, buy], 1)


def total_loss(model: MultiTaskModel, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the training step computes: the parents' label losses + :func:`funnel_loss`."""
    spec = FunnelSpec.from_config(model.config)
    base, _ = multitask_loss(logits[:, :2], labels, model.binary_mask, torch.tensor(spec.label_weights()))
    return base + funnel_loss(logits, labels, spec)


def logloss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PaddleRec's / TensorFlow's ``log_loss`` without its epsilon, elementwise, float64."""
    p, y = p.double(), y.double()
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def test_esmm_loss_is_ctr_plus_ctcvr_over_every_impression():
    model = funnel_model({"type": "esmm"})
    dense, sparse, labels = funnel_batch()
    logits = model(dense, sparse).task_logits
    p_ctr, p_cvr = torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 1])
    click, buy = labels[:, 0], torch.nan_to_num(labels[:, 1])  # purchase over impressions: 0 where not clicked
    expected = logloss(p_ctr, click).mean() + logloss(p_ctr * p_cvr, click * buy).mean()
    loss = total_loss(model, logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # no direct CVR loss: the CVR tower learns only through pCTCVR on all rows
    grad = torch.autograd.grad(loss, logits)[0]
    expected_cvr_grad = (p_ctr * p_cvr - click * buy) / (1 - p_ctr * p_cvr) * (1 - p_cvr) / len(click)
    torch.testing.assert_close(grad[:, 1].double(), expected_cvr_grad.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("clip", [15.0, 0.0])
def test_escm2_ips_matches_paddlerec_per_row_terms(clip):
    model = funnel_model({"type": "escm2", "counterfactual": "ips", "counterfactual_weight": 0.3, "ips_clip": clip})
    dense, sparse, labels = funnel_batch()
    logits = model(dense, sparse).task_logits.detach().requires_grad_(True)
    with torch.no_grad():
        logits[:3, 0] = -6.0  # propensities below 1/15: the clip matters
    p_ctr, p_cvr = torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 1])
    o, buy = labels[:, 0], torch.nan_to_num(labels[:, 1])
    inverse = 1 / p_ctr.detach().clamp_min(1e-6)
    inverse = inverse.clamp_max(clip) if clip else inverse
    risk = (logloss(p_cvr, buy) * inverse * o).mean()  # PaddleRec's counterfact_ipw, without its 1/n_click^2
    expected = logloss(p_ctr, o).mean() + 0.3 * risk + logloss(p_ctr * p_cvr, o * buy).mean()
    loss = total_loss(model, logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the inverse propensity is a constant: the risk sends no gradient into the CTR logits
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    expected_grad = torch.autograd.grad(expected, logits)[0]
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-7)


def test_escm2_dr_matches_paddlerec_error_and_imputation_losses():
    model = funnel_model({"type": "escm2", "counterfactual": "dr", "counterfactual_weight": 0.5, "ips_clip": 0})
    dense, sparse, labels = funnel_batch()
    model.train()
    logits = model(dense, sparse).task_logits  # (B, K + 1): the imputation logit after the tasks
    assert logits.shape == (12, 3)
    p_ctr, p_cvr, e_hat = torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 1]), F.softplus(logits[:, 2])
    o, buy = labels[:, 0], torch.nan_to_num(labels[:, 1])
    e = logloss(p_cvr, buy) * o  # the CVR error, observed on clicked rows
    ps = p_ctr.detach().clamp_min(1e-6)
    risk = (e_hat + o * (e - e_hat) / ps + o * (e - e_hat) ** 2 / ps).mean()  # counterfact_dr
    expected = logloss(p_ctr, o).mean() + 0.5 * risk + logloss(p_ctr * p_cvr, o * buy).mean()
    loss = total_loss(model, logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(expected.float(), params, allow_unused=True)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # the imputation tower is trained (its loss reaches it) and is not part of the scores
    assert model.eval()(dense, sparse).task_logits.shape == (12, 2)


def reference_aitm(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor):
    """The authors' graph on mtrank's weights: Shared-Bottom -> click / purchase towers -> info, attention."""
    emb = model.embedding.table.weight[sparse + model.embedding.offsets]  # (B, F, D)
    x = torch.cat([dense, emb.flatten(1)], 1)
    experts = model.block.levels[0].experts.layers[0]
    bottom = torch.relu(x @ experts.weight[0] + experts.bias[0, 0])
    tower = model.block.towers.layers[0]
    q = [torch.relu(bottom @ tower.weight[k] + tower.bias[k, 0]) for k in range(2)]
    funnel = model.block.funnel
    transfer = funnel.transfer
    info = torch.relu(q[0] @ transfer.transfer.weight[0] + transfer.transfer.bias[0, 0])
    inputs = torch.stack([q[1], info], 1)  # (B, 2, K): [tower_purchase, info]
    w1, w2, w3 = (transfer.qkv[i, 0] for i in range(3))
    a = torch.softmax((inputs @ w1 * (inputs @ w2)).sum(-1) / math.sqrt(inputs.shape[-1]), 1)
    ait = (a[:, :, None] * (inputs @ w3)).sum(1)
    out = funnel.output
    click = torch.sigmoid(q[0] @ out.weight[0] + out.bias[0, 0])[:, 0]
    purchase = torch.sigmoid(ait @ out.weight[1] + out.bias[1, 0])[:, 0]
    return click, purchase


def test_aitm_matches_the_authors_graph_and_loss():
    model = funnel_model({"type": "aitm", "calibrator_weight": 0.6})
    dense, sparse, labels = funnel_batch()
    model.train()
    logits = model(dense, sparse).task_logits  # (B, 3): ctr, cvr (conditional), cvr entire-space
    click, purchase = reference_aitm(model, dense, sparse)
    torch.testing.assert_close(torch.sigmoid(logits[:, 0]), click)
    torch.testing.assert_close(torch.sigmoid(logits[:, 2]), purchase)
    # the score of cvr is the conditional pCVR = purchase / click (capped below 1)
    pcvr = (purchase / click).clamp_max(1 - 1e-6)
    torch.testing.assert_close(torch.sigmoid(model.eval()(dense, sparse).task_logits[:, 1]), pcvr, rtol=1e-4, atol=1e-6)
    model.train()
    o, buy = labels[:, 0], torch.nan_to_num(labels[:, 1])
    expected = logloss(click, o).mean() + logloss(purchase, o * buy).mean()
    expected = expected + 0.6 * torch.relu(purchase - click).double().mean()
    loss = total_loss(model, logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params, retain_graph=True)
    want = torch.autograd.grad(expected.float(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_aitm_calibrator_penalises_a_child_above_its_parent():
    spec = FunnelSpec([-1, 0], "aitm", False, [1.0, 1.0], 0.0, 0.0, 0.6)
    labels = torch.tensor([[1.0, 0.0], [0.0, math.nan]])
    # entire-space logit of the child (last column) above the parent's on row 0 only
    logits = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -3.0]])
    with_cal = funnel_loss(logits, labels, spec)
    without = funnel_loss(logits, labels, spec._replace(calibrator_weight=0.0))
    expected = 0.6 * (torch.sigmoid(torch.tensor(2.0)) - 0.5) / 2
    assert (with_cal - without).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_chain_of_three_multiplies_down_the_funnel():
    """impression -> click -> add-to-cart -> buy: ESMM's P(buy) = pCTR x pCART x pBUY."""
    spec = FunnelSpec([-1, 0, 1], "esmm", False, [1.0, 1.0, 1.0], 0.0, 0.0, 0.0)
    logits = torch.tensor([[0.5, -0.2, 1.0], [-1.0, 0.3, 0.1]])
    labels = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, math.nan]])
    p = torch.sigmoid(logits.double())
    expected = logloss(p[:, 0] * p[:, 1], torch.tensor([1.0, 0.0])).mean()
    expected = expected + logloss(p[:, 0] * p[:, 1] * p[:, 2], torch.tensor([1.0, 0.0])).mean()
    assert funnel_loss(logits, labels, spec).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "funnel",
    [{"type": "esmm"}, {"type": "escm2"}, {"type": "escm2", "counterfactual": "dr"}, {"type": "aitm"}],
    ids=["esmm", "escm2-ips", "escm2-dr", "aitm"],
)
@pytest.mark.parametrize("block", ["mmoe", "ple"])
def test_funnel_models_export_to_torchscript_and_onnx_with_identical_scores(tmp_path, funnel, block):
    model = funnel_model(funnel, block)
    scripted = load_torchscript(export_torchscript(model, tmp_path / "model.pt"))
    assert max_difference(model, scripted) <= 1e-6
    assert max_difference(model, OnnxScorer(export_onnx(model, tmp_path / "model.onnx"))) <= 1e-5
    assert model.predict(*funnel_batch()[:2]).shape == (12, 2)  # scores: pCTR, pCVR


def test_task_dependencies_are_checked_with_messages_that_name_the_field():
    with pytest.raises(ConfigError, match=r"tasks\[1\].depends_on: 'ct' is not a task declared before 'cvr'.*ctr"):
        tasks = [{"name": "ctr"}, {"name": "cvr", "depends_on": "ct"}]
        ModelConfig.from_dict({"inputs": {"num_dense": 2}, "tasks": tasks})
    with pytest.raises(ConfigError, match=r"model.funnel.type: esmm needs a task with depends_on"):
        ModelConfig.from_dict({"inputs": {"num_dense": 2}, "funnel": {"type": "esmm"}}).validate("model")
    with pytest.raises(ConfigError, match=r"model.towers.hidden: aitm transfers a tower's last hidden layer"):
        ModelConfig.from_dict(
            {"inputs": {"num_dense": 2}, "tasks": TASKS, "towers": {"hidden": []}, "funnel": {"type": "aitm"}}
        ).validate("model")
    with pytest.raises(ConfigError, match=r"depends_on: a funnel links binary tasks"):
        tasks = [{"name": "ctr"}, {"name": "watch", "type": "regression", "depends_on": "ctr"}]
        ModelConfig.from_dict({"inputs": {"num_dense": 2}, "tasks": tasks}).validate("model")
    with pytest.raises(ConfigError, match=r"funnel.ips_clip: an inverse propensity is >= 1"):
        ModelConfig.from_dict({"inputs": {"num_dense": 2}, "funnel": {"ips_clip": 0.5}}).validate("model")


# ------------------------------------------------------------------------------ the funnel data and the study


def test_the_funnel_generator_knows_the_cvr_of_every_impression():
    data, true_cvr = make_funnel(n=40_000, seed=0)
    click, conversion = data.labels[:, 0], data.labels[:, 1]
    assert torch.equal(conversion.isnan(), click == 0)  # conversions are seen on clicked rows only
    clicked = click == 1
    # the observed CVR of clicked rows estimates the true CVR of clicked rows, which is not the CVR over all
    observed = conversion[clicked].mean().item()
    assert observed == pytest.approx(true_cvr[clicked].mean().item(), abs=0.015)
    assert true_cvr[clicked].mean() - true_cvr.mean() > 0.05  # sample selection bias
    assert make_funnel(n=100, seed=3)[1].tolist() == make_funnel(n=100, seed=3)[1].tolist()


def load_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import zoo_funnel

    return zoo_funnel


def test_zoo_funnel_quick_mode_writes_bias_against_the_truth_with_paired_intervals(tmp_path):
    zoo_funnel = load_benchmark()
    assert zoo_funnel.main(["--quick", "--out", str(tmp_path / "funnel")]) == 0
    results = json.loads((tmp_path / "funnel.json").read_text())
    assert list(results["runs"]) == ["naive", "esmm", "escm2-ips", "escm2-dr", "aitm"]
    assert all(len(runs) == 2 and math.isfinite(runs[0]["bias"]) for runs in results["runs"].values())
    interval = results["paired_vs_naive"]["esmm"]["rmse"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert "| escm2-dr |" in (tmp_path / "funnel.md").read_text()


# ------------------------------------------------------------------------ Ali-CCP / AliExpress sample configs


def sample_config(name: str, shared_data: Path, **model) -> dict:
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    for key in ("train", "valid", "test"):
        if key in raw["data"]:
            raw["data"][key] = str(shared_data / raw["data"][key].removeprefix("../../shared/data/"))
    raw["train"].update(epochs=2, batch_size=64, progress=False)
    raw["model"]["funnel"].update(model)
    return raw


@pytest.mark.parametrize(
    "name, funnel",
    [
        ("ali_ccp_esmm.yaml", {}),
        ("ali_ccp_esmm.yaml", {"type": "escm2", "counterfactual": "ips"}),
        ("ali_ccp_esmm.yaml", {"type": "escm2", "counterfactual": "dr"}),
        ("ali_ccp_esmm.yaml", {"type": "aitm"}),
        ("aliexpress_aitm.yaml", {}),
        ("aliexpress_aitm.yaml", {"type": "esmm"}),
    ],
)
def test_funnel_configs_train_on_the_shipped_samples_and_serve_the_declared_scores(tmp_path, shared_data, name, funnel):
    raw = sample_config(name, shared_data, **funnel)
    result = mtrank.fit(raw, output=tmp_path / "model")
    assert all(math.isfinite(m["loss"]) for m in result.metrics.values())
    cvr_metrics = [key for key in result.metrics["test"] if key.endswith("/cvr")]
    assert cvr_metrics  # CVR metrics over the test split's clicked rows
    frame = pd.read_csv(raw["data"]["test"]).head(3)
    features = raw["features"]["categorical"] + raw["features"]["numeric"]
    candidates = [{f: row[f] for f in features} for row in frame.to_dict("records")]
    for backend in ("eager", "onnx"):
        response = ScoringService(tmp_path / "model", backend).score(ScoreRequest(candidates=candidates))
        assert response.tasks == ["ctr", "cvr"]
        assert all(0 < s["ctr"] < 1 and 0 < s["cvr"] < 1 for s in response.scores)


def test_a_dependent_tasks_label_exists_only_where_its_parent_is_one(shared_data):
    config = experiment_from_dict(sample_config("ali_ccp_esmm.yaml", shared_data))
    assert config.tasks[1].mask_column == "click"
    table, _ = read_table(config.data.train, config)
    labels = encode_labels(table, config.tasks, "ali-ccp")
    click = labels[:, 0]
    assert np.isnan(labels[click == 0, 1]).all() and not np.isnan(labels[click == 1, 1]).any()


def test_evaluation_adds_the_entire_space_auc_of_the_product_over_every_impression():
    tasks = ModelConfig.from_dict({"inputs": {"num_dense": 1}, "tasks": TASKS}).tasks
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.5], [1.0, 0.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, math.nan], [0.0, math.nan]])
    metrics = task_metrics(tasks, logits, labels)
    p = torch.sigmoid(logits.double())
    ctcvr, y = (p[:, 0] * p[:, 1]).numpy(), np.array([1.0, 0.0, 0.0, 0.0])
    assert metrics["auc/cvr_entire"] == pytest.approx(roc_auc_score(y, ctcvr))
    assert metrics["logloss/cvr_entire"] == pytest.approx(log_loss(y, ctcvr))
    assert metrics["auc/cvr"] == 1.0  # pCVR on the two clicked rows only


# ------------------------------------------------------------------------------------------- training paths


@pytest.mark.parametrize("funnel", ["esmm", "escm2-dr", "aitm"])
def test_an_ensemble_member_trains_as_the_same_seed_alone_with_the_funnel_loss(funnel):
    """The Trainer and the vmapped Ensemble both add :func:`funnel_loss` (and zero the dependent task's own
    weight): member r's validation history is the single run's."""
    zoo_funnel = load_benchmark()
    config = zoo_funnel.model_config(16, zoo_funnel.FUNNELS[funnel])
    seeds = [1, 2]
    parts = [make_funnel(n=900, seed=s)[0] for s in seeds]
    train = EnsembleData.stack([p[:600] for p in parts])
    valid = EnsembleData.stack([p[600:] for p in parts])
    train_cfg = TrainConfig(lr=3e-3, batch_size=100, steps=24, eval_every=8, progress=False)
    result = Ensemble(config, seeds).fit(train, valid, train_cfg)
    for r, seed in enumerate(seeds):
        single = Trainer(MultiTaskModel(config, seed=seed), TrainConfig(**{**train_cfg.__dict__, "seed": seed}))
        history = single.fit(train.member(r), valid.member(r)).history
        assert [h["valid/loss"] for h in result.history[r]] == pytest.approx(
            [h["valid/loss"] for h in history], rel=1e-4
        )
        assert history[-1]["valid/loss"] < history[0]["valid/loss"]  # it learns


def test_funnel_models_export_with_torch_export():
    for funnel in ({"type": "escm2", "counterfactual": "dr"}, {"type": "aitm"}):
        module = ScoringModule(funnel_model(funnel, "mmoe").eval())
        dense, sparse, _ = funnel_batch()
        exported = torch.export.export(module, (dense, sparse)).module()
        torch.testing.assert_close(exported(dense, sparse), module(dense, sparse))


def test_the_bias_tower_adds_to_the_task_logits_only_in_a_funnels_training_forward():
    model = funnel_model({"type": "escm2", "counterfactual": "dr"}, bias={"features": [1], "dropout": 0.0})
    dense, sparse, _ = funnel_batch()
    model.train()
    with_bias = model(dense, sparse).task_logits  # (B, K + 1)
    bias = model.bias_tower(sparse.index_select(1, model.bias_features))
    model.bias_tower = None
    without = model(dense, sparse).task_logits
    torch.testing.assert_close(with_bias[:, :2] - without[:, :2], bias)
    torch.testing.assert_close(with_bias[:, 2], without[:, 2])  # the imputation column is not biased
