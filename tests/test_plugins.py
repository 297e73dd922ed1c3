"""A new expert type and a new gate type registered from outside the package, as a user would: one class each
in their own module, named under ``plugins:`` in the config, trained, evaluated and exported through the CLI."""

import json
import textwrap

import pytest
import yaml

from mtrank.cli import main
from tabular_helpers import BASE_CONFIG, make_frame, one_torch_thread  # noqa: F401

TOY_PARTS = '''
"""Toy parts: linear experts with a fixed output scale, and gates that ignore the input."""
from dataclasses import dataclass

import torch
from torch import nn

from mtrank.config import EXPERTS, GATES, ExpertConfig, GateConfig
from mtrank.config.base import check


@dataclass
class ScaledExpertConfig(ExpertConfig):
    type: str = "scaled_linear"
    scale: float = 1.0

    def check(self, path):
        super().check(path)
        check(self.scale > 0, f"{path}.scale", f"must be > 0, got {self.scale}")


@EXPERTS.register("scaled_linear", ScaledExpertConfig)
class ScaledLinearExperts(nn.Module):
    """G experts relu(x W_g) * scale: [B, in] or [G, B, in] -> [G, B, out]."""

    def __init__(self, groups, in_features, out_features, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(groups, in_features, out_features) / in_features**0.5)
        self.scale, self.output_dim = scale, out_features

    @classmethod
    def from_config(cls, groups, in_features, config):
        return cls(groups, in_features, config.hidden[-1], config.scale)

    def forward(self, x):
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], -1, -1)
        return torch.relu(torch.bmm(x, self.weight)) * self.scale


@GATES.register("input_free")
class InputFreeGates(nn.Module):
    """Each gate is a softmax over learned per-expert logits, the same for every row."""

    def __init__(self, in_features, allowed):
        super().__init__()
        self.num_gates = allowed.shape[0]
        self.register_buffer("allowed", allowed.clone())
        self.logits = nn.Parameter(torch.zeros(allowed.shape))

    @classmethod
    def from_config(cls, in_features, allowed, config):
        return cls(in_features, allowed)

    def forward(self, x):
        weights = torch.softmax(self.logits.masked_fill(~self.allowed, float("-inf")), -1)
        return weights.expand(x.shape[-2], -1, -1), torch.zeros((), device=x.device)
'''


@pytest.fixture
def project(tmp_path):
    """A user's folder: data, a config naming the plugin module that sits beside it, the module."""
    make_frame(n=400).to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "toy_parts.py").write_text(textwrap.dedent(TOY_PARTS))
    config = {
        **BASE_CONFIG,
        "plugins": ["toy_parts"],
        "data": {"train": "rows.csv", "split": {"method": "random", "fractions": [0.7, 0.15, 0.15]}},
        "model": {
            "block": {"type": "mmoe", "num_experts": 3},
            "experts": {"type": "scaled_linear", "hidden": [8], "scale": 0.5},
            "gate": {"type": "input_free"},
        },
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "progress": False},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_a_registered_expert_and_gate_train_evaluate_and_export_through_the_cli(project, capsys):
    out = project / "model"
    assert main(["train", str(project / "exp.yaml"), "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["plugins"] == ["toy_parts"]
    assert meta["model"]["experts"] == {
        "type": "scaled_linear",
        "hidden": [8],
        "activation": "relu",
        "dropout": 0.0,
        "scale": 0.5,
    }
    assert meta["model"]["gate"]["type"] == "input_free"
    capsys.readouterr()
    assert main(["evaluate", str(out), str(project / "rows.csv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["auc/click"] > 0.5
    assert main(["export", str(out), "--format", "onnx"]) == 0
    assert (out / "export" / "model.onnx").is_file()


def test_a_registered_types_own_options_are_type_checked(project, capsys):
    raw = yaml.safe_load((project / "exp.yaml").read_text())
    raw["model"]["experts"]["scale"] = -1
    (project / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(project / "bad.yaml"), "--no-progress"]) == 1
    assert "model.experts.scale: must be > 0, got -1.0" in capsys.readouterr().err
    raw["model"]["experts"]["scale"] = 0.5
    raw["model"]["gate"] = {"type": "input_fre"}
    (project / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(project / "bad.yaml"), "--no-progress"]) == 1
    assert "model.gate.type: unknown gate type 'input_fre'; did you mean 'input_free'?" in capsys.readouterr().err
