"""PEPNet (Chang et al., KDD 2023) against a loop over the paper's equations:

* Gate NU: ``delta = gamma * sigmoid(W2 relu(W1 x + b1) + b2)``;
* EPNet: ``O_ep = delta_domain * E``, ``delta_domain = GateNU(E(F_d) ++ sg(E))``;
* PPNet: tower layer l of task t reads ``delta_l^t * H_l^t``, ``[delta_l^1..K] = GateNU_l(E(F_p) ++ sg(O_ep))``.
Features are named (the experiment fills ``inputs.names``) or given by index."""

import json
import re

import pytest
import torch
import yaml

from mtrank.cli import main
from mtrank.config import ConfigError, ModelConfig
from mtrank.model import MultiTaskModel
from tabular_helpers import config, make_frame

TASKS = [{"name": "click"}, {"name": "watch", "type": "regression"}]
INPUTS = {"num_dense": 2, "vocab_sizes": [5, 6, 4], "embedding_dim": 3, "names": ["user", "item", "scenario"]}


def gate_nu(unit, x: torch.Tensor) -> torch.Tensor:
    first, _, second = unit.net
    return unit.scale * torch.sigmoid(torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias)


def reference_pepnet(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Shared-Bottom block under PEPNet (one expert, weight 1), looped."""
    emb = model.embedding.table.weight[sparse + model.embedding.offsets]  # (B, F, D)
    general = torch.cat([dense, emb.flatten(1)], 1)  # E
    domain = emb[:, 2]  # E(F_d): scenario
    o_ep = gate_nu(model.epnet.gate, torch.cat([domain, general.detach()], 1)) * general
    prior = emb[:, [0, 1]].flatten(1)  # E(F_p): user, item
    experts = model.block.levels[0].experts
    h = o_ep
    for layer in experts.layers:
        h = torch.relu(h @ layer.weight[0] + layer.bias[0, 0])
    logits = []
    towers = model.block.towers.layers
    for k in range(model.block.num_tasks):
        t = h
        for i, layer in enumerate(towers):
            delta = gate_nu(model.ppnet.gates[i], torch.cat([prior, o_ep.detach()], 1))  # (B, K * in_l)
            t = t * delta.view(t.shape[0], model.block.num_tasks, -1)[:, k]
            t = t @ layer.weight[k] + layer.bias[k, 0]
            t = torch.relu(t) if i < len(towers) - 1 else t
        logits.append(t[:, 0])
    return torch.stack(logits, 1)


def pepnet_model(**pepnet) -> MultiTaskModel:
    config = ModelConfig.from_dict(
        {
            "inputs": INPUTS,
            "tasks": TASKS,
            "block": "shared_bottom",
            "experts": {"hidden": [5]},
            "towers": {"hidden": [4, 3]},
            "pepnet": {"epnet": ["scenario"], "ppnet": ["user", 1], "hidden": 6, **pepnet},
        }
    )
    return MultiTaskModel(config).eval()


def test_pepnet_matches_the_equation_loop_forward_and_gradients():
    model = pepnet_model()
    torch.manual_seed(0)
    dense, sparse = torch.randn(8, 2), torch.stack([torch.randint(0, v, (8,)) for v in (5, 6, 4)], 1)
    out = model(dense, sparse)
    ref = reference_pepnet(model, dense, sparse)
    torch.testing.assert_close(out.task_logits, ref, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.task_logits.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert len(model.ppnet.gates) == 3  # one gate unit per tower layer: inputs 5, 4, 3 wide, per task


def test_gates_start_in_zero_to_gamma_and_scale_changes_the_range():
    model = pepnet_model(scale=3.0)
    x = torch.randn(50, model.epnet.gate.net[0].in_features) * 5
    delta = model.epnet.gate(x)
    assert ((delta > 0) & (delta < 3.0)).all() and delta.max() > 2.0


@pytest.mark.parametrize(
    "pepnet, message",
    [
        (
            {"epnet": ["scenari"]},
            "model.pepnet.epnet[0]: unknown categorical feature 'scenari'; did you mean 'scenario'?",
        ),
        ({"ppnet": [7]}, "model.pepnet.ppnet[0]: index 7 is not a categorical feature"),
        ({"hidden": 0}, "model.pepnet.hidden: must be >= 1"),
    ],
)
def test_bad_pepnet_features_name_the_field(pepnet, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        pepnet_model(**pepnet)


def test_a_pepnet_model_names_features_through_train_evaluate_and_export(tmp_path, capsys):
    """Through the CLI: the experiment fills ``inputs.names`` from its categorical features, the model directory
    keeps them, evaluation and ONNX export rebuild the model from it."""
    make_frame(n=400).to_csv(tmp_path / "rows.csv", index=False)
    raw = config(
        data={"train": "rows.csv", "split": {"method": "random", "fractions": [0.7, 0.15, 0.15]}},
        model={**config()["model"], "pepnet": {"epnet": ["city"], "ppnet": ["user"], "hidden": 8}},
        train={**config()["train"], "epochs": 2},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "model"
    assert main(["train", str(tmp_path / "exp.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["inputs"]["names"] == ["city", "user"]
    capsys.readouterr()
    assert main(["evaluate", str(out), str(tmp_path / "rows.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auc/click"] > 0.5
    assert main(["export", str(out), "--format", "onnx"]) == 0
