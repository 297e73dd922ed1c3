"""``model.inputs.pad_to``: zero columns after the block input change the width, not the function."""

from pathlib import Path

import pytest
import torch

from mtrank.config import ConfigError, ModelConfig, TaskConfig
from mtrank.model import MultiTaskModel

CENSUS = str(Path(__file__).resolve().parents[1] / "configs" / "census_income.yaml")


def config(pad_to: int, experts: dict, block: str = "mmoe") -> ModelConfig:
    return ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [7, 5], "embedding_dim": 4, "pad_to": pad_to},
        tasks=[TaskConfig("a", "binary"), TaskConfig("b", "regression")],
        block={"type": block, "num_experts": 3},
        experts=experts,
        towers={"hidden": [4]},
    )


def copy_into_leading_slices(src: MultiTaskModel, dst: MultiTaskModel) -> int:
    """Every parameter of ``src`` into the leading slice of ``dst``'s, the rest zero; how many differ in shape."""
    wider = 0
    with torch.no_grad():
        for (name, a), (name_b, b) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
            assert name == name_b
            b.zero_()
            b[tuple(slice(0, n) for n in a.shape)] = a
            wider += a.shape != b.shape
    return wider


@pytest.mark.parametrize(
    "experts,block",
    [
        ({"type": "mlp", "hidden": [8]}, "mmoe"),
        ({"type": "dcn", "cross_layers": 2, "cross_rank": 3, "hidden": [8]}, "mmoe"),
        ({"type": "mlp", "hidden": [8]}, "shared_bottom"),
    ],
)
def test_padded_model_computes_the_unpadded_function_and_pads_get_no_gradient(experts, block):
    torch.manual_seed(0)
    plain = MultiTaskModel(config(1, experts, block))
    padded = MultiTaskModel(config(8, experts, block))
    assert plain.input_pad == 0 and padded.input_pad == 5  # 3 dense + 2 x 4 = 11 -> 16
    assert copy_into_leading_slices(plain, padded) > 0
    dense, sparse = torch.randn(32, 3), torch.stack([torch.randint(0, 7, (32,)), torch.randint(0, 5, (32,))], 1)
    x, _, _ = padded.block_input(dense, sparse)
    assert x.shape == (32, 16) and torch.all(x[:, 11:] == 0)
    out_plain, out_padded = plain(dense, sparse).task_logits, padded(dense, sparse).task_logits
    torch.testing.assert_close(out_padded, out_plain, rtol=1e-6, atol=1e-6)
    out_padded.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), padded.parameters(), strict=True):
        for dim, (n, m) in enumerate(zip(a.shape, b.shape, strict=True)):
            if n != m:  # a width that reads or writes the zero columns: no gradient there
                assert torch.count_nonzero(b.grad.narrow(dim, n, m - n)) == 0, name


def test_pad_to_must_be_positive():
    with pytest.raises(ConfigError, match=r"inputs.pad_to: must be >= 1"):
        config(0, {"type": "mlp", "hidden": [8]}).validate("model")


def test_pad_to_from_yaml_survives_the_model_directorys_config():
    from mtrank.config.experiment import experiment_from_dict, load_experiment

    experiment = load_experiment(CENSUS, {"model.inputs.pad_to": 64})
    assert experiment_from_dict(experiment.to_dict()).model.inputs.pad_to == 64
    assert "pad_to" not in load_experiment(CENSUS).to_dict()["model"]["inputs"]
