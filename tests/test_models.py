import dataclasses
import math
import re
import statistics

import pytest
import torch

from mtrank.config import GATES, ConfigError, GateConfig, ModelConfig, TaskConfig
from mtrank.model import MultiTaskModel, count_parameters, size_shared_bottom
from mtrank.nn import StackedMLP
from reference import naive_forward

TASKS = [TaskConfig("click", "binary"), TaskConfig("watch", "regression"), TaskConfig("like", "binary")]


def make_gates(in_features: int, allowed: torch.Tensor, config: GateConfig):
    """The registered gate module of ``config.type``."""
    return GATES.module(config.type).from_config(in_features, allowed, config)


def make_inputs(config: ModelConfig, batch: int = 16):
    dense = torch.randn(batch, config.inputs.num_dense)
    sparse = (
        torch.stack([torch.randint(0, v, (batch,)) for v in config.inputs.vocab_sizes], 1)
        if config.inputs.vocab_sizes
        else torch.zeros(batch, 0, dtype=torch.long)
    )
    return dense, sparse


@pytest.mark.parametrize("block", ["mmoe", "omoe", "shared_bottom", "single_task", "cgc", "ple"])
@pytest.mark.parametrize("shared_hidden", [[], [32]])
def test_batched_experts_match_naive_loop_forward_and_gradients(block, shared_hidden):
    config = ModelConfig(
        inputs={"num_dense": 7, "vocab_sizes": [11, 5, 3], "embedding_dim": 4},
        tasks=TASKS,
        block={"type": block, "num_experts": 4, "task_experts": 2, "shared_hidden": shared_hidden},
        experts={"hidden": [12, 6]},
        towers={"hidden": [5]},
    )
    model = MultiTaskModel(config).eval()
    dense, sparse = make_inputs(config)
    out = model(dense, sparse)
    ref_logits, ref_gates = naive_forward(model, dense, sparse)
    torch.testing.assert_close(out.task_logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.gate_weights, ref_gates, rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad(out.task_logits.sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(ref_logits.sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if g is None and r is None:
            continue
        g = torch.zeros_like(r) if g is None else g
        r = torch.zeros_like(g) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_stacked_mlp_shared_and_per_group_input_agree():
    mlp = StackedMLP(groups=3, in_features=6, hidden=[4, 2])
    x = torch.randn(5, 6)
    torch.testing.assert_close(mlp(x), mlp(x.expand(3, -1, -1)))


def test_experts_differ_at_initialisation():
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 20}, block={"type": "mmoe", "num_experts": 8}))
    w = model.block.levels[0].experts.layers[0].weight  # (E, in, out)
    for e in range(1, 8):
        assert not torch.allclose(w[0], w[e])


def test_gates_start_near_uniform_and_sum_to_one():
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 20}, tasks=TASKS, block={"type": "mmoe", "num_experts": 8}))
    out = model(torch.randn(64, 20), torch.zeros(64, 0, dtype=torch.long))
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(64, 3))
    assert (out.gate_weights - 1 / 8).abs().max() < 0.05


def test_gate_weights_sum_to_one_per_task_with_temperature_dropout_and_topk():
    for gate in [
        GateConfig.from_dict({"temperature": 0.5}),
        GateConfig.from_dict({"dropout": 0.3}),
        GateConfig.from_dict({"type": "topk", "k": 2}),
    ]:
        gates = make_gates(10, torch.ones(3, 6, dtype=torch.bool), gate).train()
        w, _ = gates(torch.randn(128, 10))
        torch.testing.assert_close(w.sum(-1), torch.ones(128, 3))


def test_gate_dropout_zeroes_and_renormalises():
    gates = make_gates(10, torch.ones(2, 8, dtype=torch.bool), GateConfig.from_dict({"dropout": 0.5}))
    x = torch.randn(256, 10)
    gates.eval()
    full, _ = gates(x)
    gates.train()
    torch.manual_seed(1)
    dropped, _ = gates(x)
    zero = dropped == 0
    assert zero.any(), "some expert weights must be dropped"
    assert zero.float().mean() == pytest.approx(0.5, abs=0.05)
    torch.testing.assert_close(dropped.sum(-1), torch.ones(256, 2))
    # the kept weights are the eval weights renormalised over the kept experts
    kept = torch.where(zero, torch.zeros_like(full), full)
    torch.testing.assert_close(dropped, kept / kept.sum(-1, keepdim=True))
    assert (full > 0).all()


def test_top_k_keeps_exactly_k_experts_and_returns_a_balancing_loss():
    gates = make_gates(
        10, torch.ones(2, 8, dtype=torch.bool), GateConfig.from_dict({"type": "topk", "k": 3, "noisy": True})
    )
    for mode in (True, False):
        gates.train(mode)
        w, aux = gates(torch.randn(100, 10))
        assert ((w > 0).sum(-1) == 3).all()
    gates.train()
    _, aux = gates(torch.randn(100, 10))
    assert aux.item() > 0 and aux.requires_grad


def test_load_balance_loss_equals_the_value_computed_by_hand():
    """Shazeer et al. (2017), one gate over 3 experts, k = 1, two rows, noise std 1: importance = the kept
    experts' softmax summed over rows = [1, 1, 0]; load_e = sum_b Phi((clean - threshold) / std) with the
    threshold the 2nd-largest noisy logit for a kept expert, else the largest; loss = cv^2(imp) + cv^2(load)."""
    from mtrank.nn.gates import load_balance_loss

    clean = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]]).unsqueeze(1)  # (B=2, G=1, E=3)
    noisy = torch.tensor([[1.2, 0.1, -0.8], [0.3, 1.9, 0.4]]).unsqueeze(1)
    keep = torch.tensor([[True, False, False], [False, True, False]]).unsqueeze(1)
    loss = load_balance_loss(clean, noisy, torch.ones(2, 1, 3), keep, 1, torch.ones(1, 3, dtype=torch.bool))

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def cv2(xs):
        return statistics.variance(xs) / statistics.mean(xs) ** 2

    # z: row 0 keeps e0 (threshold 0.1), others must beat 1.2; row 1 keeps e1 (0.4), others must beat 1.9
    load = [phi(1.0 - 0.1) + phi(0.0 - 1.9), phi(0.0 - 1.2) + phi(2.0 - 0.4), phi(-1.0 - 1.2) + phi(0.5 - 1.9)]
    expected = cv2([1.0, 1.0, 0.0]) + cv2(load)
    assert expected == pytest.approx(1.3282590, abs=1e-6)  # 0.75 + 0.578259
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mmoe_with_one_expert_equals_shared_bottom():
    mmoe_cfg = ModelConfig(
        inputs={"num_dense": 9}, tasks=TASKS, block={"type": "mmoe", "num_experts": 1}, experts={"hidden": [13]}
    )
    sb_cfg = dataclasses.replace(mmoe_cfg, block="shared_bottom")
    mmoe, sb = MultiTaskModel(mmoe_cfg).eval(), MultiTaskModel(sb_cfg).eval()
    sb.load_state_dict({k: v for k, v in mmoe.state_dict().items() if k in sb.state_dict()})
    dense, sparse = make_inputs(mmoe_cfg)
    torch.testing.assert_close(mmoe(dense, sparse).task_logits, sb(dense, sparse).task_logits)
    assert (mmoe(dense, sparse).gate_weights == 1).all()


def test_omoe_gives_identical_gate_weights_for_every_task():
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 9}, tasks=TASKS, block={"type": "omoe", "num_experts": 5}))
    w = model(*make_inputs(model.config)).gate_weights
    assert w.shape == (16, 3, 5)
    torch.testing.assert_close(w[:, 0], w[:, 1])
    torch.testing.assert_close(w[:, 0], w[:, 2])
    mmoe = MultiTaskModel(ModelConfig(inputs={"num_dense": 9}, tasks=TASKS, block={"type": "mmoe", "num_experts": 5}))
    with torch.no_grad():
        mmoe.block.levels[0].gates.proj.weight.normal_()
    w = mmoe(*make_inputs(mmoe.config)).gate_weights
    assert not torch.allclose(w[:, 0], w[:, 1])


def test_single_task_and_cgc_gates_see_only_their_experts():
    st = MultiTaskModel(ModelConfig(inputs={"num_dense": 4}, tasks=TASKS, block="single_task"))
    w = st(*make_inputs(st.config)).gate_weights
    torch.testing.assert_close(w[0], torch.eye(3))
    cgc = MultiTaskModel(
        ModelConfig(inputs={"num_dense": 4}, tasks=TASKS, block={"type": "cgc", "num_experts": 2, "task_experts": 2})
    )
    w = cgc(*make_inputs(cgc.config)).gate_weights  # experts: 2 per task (6), then 2 shared
    assert w.shape[-1] == 8
    assert (w[:, 0, 2:6] == 0).all() and (w[:, 0, :2] > 0).all() and (w[:, 0, 6:] > 0).all()


def test_paper_sizes_and_shared_bottom_sizing():
    tasks = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
    mmoe = ModelConfig(
        inputs={"num_dense": 100}, tasks=tasks, block={"type": "mmoe", "num_experts": 8}, experts={"hidden": [16]}
    )
    sb = size_shared_bottom(mmoe)
    target = count_parameters(MultiTaskModel(mmoe))
    got = count_parameters(MultiTaskModel(sb))
    assert sb.block.type == "shared_bottom"
    assert abs(got - target) <= count_parameters(MultiTaskModel(dataclasses.replace(sb, experts={"hidden": [1]})))
    # experts: 8 * (100*16 + 16) = 12,928 weights
    assert sum(p.numel() for p in MultiTaskModel(mmoe).block.levels[0].experts.parameters()) == 12_928


@pytest.mark.parametrize(
    "data, field",
    [
        ({"block": "mmo"}, "model.block.type: unknown 'mmo'; did you mean 'mmoe'?"),
        ({"block": {"type": "mmoe", "num_experts": 0}, "inputs": {"num_dense": 3}}, "model.block.num_experts"),
        ({"inputs": {"num_dense": 3}, "tasks": [{"name": "a", "type": "binray"}]}, "model.tasks[0].type"),
        ({"inputs": {"num_dense": 3}, "gate": {"temprature": 2}}, "model.gate.temprature: unknown field; did you"),
        ({"inputs": {"num_dense": 3}, "experts": {"hidden": []}}, "model.experts.hidden"),
        ({"inputs": {"num_dense": 3}, "tasks": [{"name": "a"}, {"name": "a"}]}, "model.tasks"),
        ({"inputs": {"num_dense": "three"}}, "model.inputs.num_dense: expected an integer, got 'three'"),
        ({"inputs": {"num_dense": 3}, "experts": {"type": "dnc"}}, "model.experts.type: unknown expert type 'dnc'"),
        ({"inputs": {"num_dense": 3}, "gate": {"type": "topk", "k": 9}}, "model.gate.k: k=9 exceeds the 8 experts"),
        ({"num_dense": 3}, "model.num_dense: moved to model.inputs.num_dense"),
    ],
)
def test_bad_config_fails_with_an_error_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        ModelConfig.from_dict(data, "model")


def test_ple_levels_feed_task_and_shared_inputs_to_the_next_level():
    config = ModelConfig(
        inputs={"num_dense": 6},
        tasks=TASKS,
        block={"type": "ple", "levels": 3, "num_experts": 2, "task_experts": 1},
        experts={"hidden": [8]},
    )
    model = MultiTaskModel(config)
    assert len(model.block.levels) == 3
    # non-final levels have K task gates + 1 shared gate; the last only K
    assert model.block.levels[0].gates.num_gates == 4 and model.block.levels[-1].gates.num_gates == 3
    out = model(*make_inputs(config))
    assert out.gate_weights.shape == (16, 3, 5)
    assert torch.isfinite(out.task_logits).all()


def test_gate_per_gate_input_matches_shared_input():
    gates = make_gates(10, torch.ones(3, 6, dtype=torch.bool), GateConfig.from_dict({"hidden": 4}))
    x = torch.randn(7, 10)
    w_shared, _ = gates(x)
    w_stacked, _ = gates(x.expand(3, -1, -1))
    torch.testing.assert_close(w_shared, w_stacked)


EXPORT_CONFIGS = {
    "mmoe": {},
    "omoe": {"block": {"type": "omoe"}},
    "shared_bottom": {"block": {"type": "shared_bottom"}},
    "single_task": {"block": {"type": "single_task"}},
    "ple": {"block": {"type": "ple", "levels": 2}},
    "topk_gate_mlp": {"gate": {"type": "topk", "k": 2, "hidden": 4}},
    "dcn_mixer_bias": {"experts": {"type": "dcn", "cross_rank": 2}, "mixer": {"layers": 1}, "bias": {"features": [2]}},
    "bags_mixer_bias": {
        "inputs": {"vocab_sizes": [5, 6, 7, 4, 4, 4, 3, 3], "bags": [{"length": 3}, {"length": 2, "pooling": "sum"}]},
        "mixer": {"layers": 1},
        "bias": {"features": [1]},
    },
    "dense_only": {"inputs": {"vocab_sizes": []}},
    # the zoo after PLE (tests/test_zoo_*.py check each against its paper or reference code)
    "dselect_k_ple": {"block": {"type": "ple", "levels": 2}, "gate": {"type": "dselect_k", "k": 2}},
    "adatt": {"block": {"type": "adatt", "levels": 2, "task_experts": 2}},
    "home": {
        "block": {"type": "home", "task_groups": [["click", "like"], ["watch"]]},
        "experts": {"type": "home", "feature_gate_rank": 2},
    },
    "stem": {"block": {"type": "stem", "levels": 2}},
    "pepnet": {"pepnet": {"epnet": [2], "ppnet": [0, 1], "hidden": 8}},
}


def merged(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s sections merged in, key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("name", EXPORT_CONFIGS)
def test_every_configuration_scripts_and_exports_with_identical_scores(name):
    from mtrank.model import ScoringModule

    base = {"inputs": {"num_dense": 3, "vocab_sizes": [5, 6, 7], "embedding_dim": 4}, "block": {"num_experts": 3}}
    config = ModelConfig.from_dict({**merged(base, EXPORT_CONFIGS[name]), "tasks": [t.to_dict() for t in TASKS]})
    module = ScoringModule(MultiTaskModel(config).eval())
    dense, sparse = make_inputs(config, batch=8)
    expected = module(dense, sparse)
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(dense, sparse), expected)
    exported = torch.export.export(module, (dense, sparse)).module()
    torch.testing.assert_close(exported(dense, sparse), expected)


def test_bags_pool_the_embeddings_of_their_values_like_an_embedding_bag():
    """A bag's columns: its values' ids, padded with the last id; mean / sum over the non-padding ones, from
    the bag's own slice of the one table (checked against nn.EmbeddingBag on the same weights)."""
    from mtrank.nn.embedding import FeatureEmbedding

    torch.manual_seed(0)
    vocab = [5, 6, 4, 4, 4, 3, 3]  # two singles; bag 0 (ids 0..2, pad 3) x 3 columns; bag 1 (0..1, pad 2) x 2
    emb = FeatureEmbedding(2, vocab, 4, bag_lengths=[3, 2], bag_pooling=["mean", "sum"])
    assert emb.output_dim == 2 + 4 * 4 and emb.table.num_embeddings == 5 + 6 + 4 + 3
    sparse = torch.tensor([[1, 2, 0, 3, 3, 1, 2], [4, 5, 2, 2, 1, 2, 2], [0, 0, 3, 3, 3, 0, 0]])
    tokens = emb.embed(sparse)  # (B, 4, D)
    weight = emb.table.weight
    torch.testing.assert_close(tokens[:, 0], weight[sparse[:, 0]])
    torch.testing.assert_close(tokens[:, 1], weight[5 + sparse[:, 1]])
    for b, (start, length, offset, mode, pad) in enumerate([(2, 3, 11, "mean", 3), (5, 2, 15, "sum", 2)]):
        reference = torch.nn.EmbeddingBag.from_pretrained(weight[offset : offset + pad + 1], mode=mode, padding_idx=pad)
        torch.testing.assert_close(tokens[:, 2 + b], reference(sparse[:, start : start + length]))
    assert torch.equal(tokens[2, 2], torch.zeros(4))  # an all-padding bag pools to zero


def test_stacked_layers_and_cross_layers_keep_bf16_activations_under_autocast():
    """The bias is added in the GEMM's output dtype: a float32 bias must not promote bf16 activations."""
    from mtrank.nn.experts import StackedCross
    from mtrank.nn.stacked import StackedLinear

    torch.manual_seed(0)
    layer, cross = StackedLinear(3, 8, 4), StackedCross(3, 8, layers=2, rank=2)
    x = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert cross(x.bfloat16()).dtype == torch.bfloat16
    ref = torch.baddbmm(layer.bias, x, layer.weight)
    torch.testing.assert_close(layer(x), ref)
