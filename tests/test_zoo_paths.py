"""Every zoo architecture on every path a model takes: ONNX in onnxruntime (identical scores), bf16 autocast
(forward and backward), an Ensemble of runs (vmap), reduced-precision inference, and the facts the CUDA-graph
plan reads. TorchScript and torch.export: tests/test_models.py (EXPORT_CONFIGS)."""

import pytest
import torch

from mtrank.config import ModelConfig
from mtrank.data.tensors import TensorData
from mtrank.export.common import max_difference
from mtrank.export.onnx import OnnxScorer, export_onnx
from mtrank.export.precision import inference_model
from mtrank.model import MultiTaskModel
from mtrank.train.ensemble import Ensemble

TASKS = [{"name": "click"}, {"name": "watch", "type": "regression"}, {"name": "like"}]
INPUTS = {"num_dense": 3, "vocab_sizes": [5, 6, 7], "embedding_dim": 4, "names": ["user", "item", "scenario"]}
ZOO = {
    "dselect_k": {"block": {"type": "mmoe", "num_experts": 5}, "gate": {"type": "dselect_k", "k": 2}},
    "adatt": {"block": {"type": "adatt", "levels": 2, "num_experts": 1}},
    "home": {
        "block": {"type": "home", "num_experts": 2, "task_groups": [["click", "like"], ["watch"]]},
        "experts": {"type": "home", "feature_gate_rank": 2},
    },
    "stem": {"block": {"type": "stem", "levels": 2, "num_experts": 1}},
    "pepnet": {"block": {"type": "mmoe", "num_experts": 3}, "pepnet": {"epnet": ["scenario"], "ppnet": ["user"]}},
    # task dependencies (like after click): ESCM2-DR's imputation tower, AITM's transfer (tests/test_zoo_funnel.py)
    "escm2_dr": {
        "tasks": [*TASKS[:2], {"name": "like", "depends_on": "click"}],
        "block": {"type": "ple", "levels": 2},
        "funnel": {"type": "escm2", "counterfactual": "dr"},
    },
    "aitm": {
        "tasks": [*TASKS[:2], {"name": "like", "depends_on": "click"}],
        "block": {"type": "mmoe", "num_experts": 3},
        "funnel": {"type": "aitm"},
    },
}


def zoo_model(name: str, seed: int = 0) -> MultiTaskModel:
    return MultiTaskModel(ModelConfig.from_dict({"inputs": INPUTS, "tasks": TASKS, **ZOO[name]}), seed=seed)


def batch(rows: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (rows,), generator=generator) for v in INPUTS["vocab_sizes"]], 1)
    return torch.randn(rows, 3, generator=generator), sparse


@pytest.mark.parametrize("name", ZOO)
def test_onnx_scores_in_onnxruntime_equal_eager(name, tmp_path):
    model = zoo_model(name).eval()
    scorer = OnnxScorer(export_onnx(model, tmp_path / "model.onnx"))
    assert max_difference(model, scorer, batch=37) <= 1e-5  # a batch size the export was not traced with


@pytest.mark.parametrize("name", ZOO)
def test_bf16_autocast_forward_and_backward(name):
    model = zoo_model(name)
    dense, sparse = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(dense, sparse)
    loss = out.task_logits.float().square().mean() + out.aux_loss
    loss.backward()
    assert out.gate_weights.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts activations, not weights
    assert all(p.grad is not None for n, p in model.named_parameters() if "bias_tower" not in n)


@pytest.mark.parametrize("name", ZOO)
def test_an_ensemble_of_runs_computes_each_members_logits(name):
    ensemble = Ensemble(ModelConfig.from_dict({"inputs": INPUTS, "tasks": TASKS, **ZOO[name]}), init_seeds=[0, 1])
    ensemble.train(False)
    dense, sparse = batch(8)
    stacked = TensorData(dense.expand(2, -1, -1), sparse.expand(2, -1, -1), torch.zeros(2, 8, 3))
    logits, aux = ensemble.forward(stacked)
    for member, seed in enumerate((0, 1)):
        single = zoo_model(name, seed).eval()(dense, sparse)
        torch.testing.assert_close(logits[member], single.task_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux[member], single.aux_loss, rtol=1e-5, atol=1e-6)


def test_batch_norm_experts_update_each_members_running_statistics_in_an_ensemble():
    ensemble = Ensemble(ModelConfig.from_dict({"inputs": INPUTS, "tasks": TASKS, **ZOO["home"]}), init_seeds=[0, 1])
    ensemble.train(True)
    dense, sparse = batch(8)
    dense = torch.stack([dense, dense * 3])  # each member sees other rows
    ensemble.forward(TensorData(dense, sparse.expand(2, -1, -1), torch.zeros(2, 8, 3)))
    running = ensemble.buffers["block.levels.0.experts.norms.0.running_mean"]  # (R, E, 1, D)
    assert running.abs().sum() > 0 and not torch.allclose(running[0], running[1])


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("precision", ["mixed", "int8"])
def test_reduced_precision_inference_stays_close(name, precision):
    model = zoo_model(name).eval()
    reduced = inference_model(model, precision)
    assert max_difference(model, lambda d, s: reduced.predict(d, s)) < 0.05


def test_the_cuda_graph_plan_sees_every_random_source():
    """No zoo part draws random numbers (the step replays exactly from a CUDA graph); HoME's BatchNorm updates
    its running statistics in place on the device (graphed like Adam's state); gate dropout is refused by
    DSelect-k's config, not silently ignored."""
    for name in ZOO:
        assert zoo_model(name).random_sources() == []
    with_dropout = dict(ZOO["home"], experts={"type": "home", "dropout": 0.1})
    model = MultiTaskModel(ModelConfig.from_dict({"inputs": INPUTS, "tasks": TASKS, **with_dropout}))
    assert model.random_sources() == [
        "dropout (block.levels.0.experts.dropout)",
        "dropout (block.levels.1.experts.dropout)",
    ]


@pytest.mark.parametrize("name", ZOO)
def test_an_ensemble_members_weights_load_into_a_single_model(name):
    """What an ensemble keeps per member (parameters and buffers) is exactly a single model's state dict."""
    ensemble = Ensemble(ModelConfig.from_dict({"inputs": INPUTS, "tasks": TASKS, **ZOO[name]}), init_seeds=[0, 1])
    member = {key: value[1] for key, value in ensemble.state_dict().items()}
    single = zoo_model(name, seed=5)
    single.load_state_dict(member)  # strict: no key missing, none unexpected
    torch.testing.assert_close(single.state_dict(), zoo_model(name, seed=1).state_dict())
