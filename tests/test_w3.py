"""benchmarks/w3.py: every path (throughput, FLOPs, MFU, profile, AUC study) runs at tiny size on CPU, and its
numbers mean what they say."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import w3  # noqa: E402
from _peers.workloads import W2  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402
from tabular_helpers import one_torch_thread  # noqa: E402, F401


def test_quick_w3_on_cpu_reports_throughput_mfu_memory_profile_and_auc(tmp_path):
    out = tmp_path / "w3.json"
    w3.main(["--device", "cpu", "--quick", "--batch-sizes", "128", "--lrs", "128=0.003", "--json", str(out)])
    result = json.loads(out.read_text())
    run = result["batches"]["128"]
    assert result["workload"] == "W3" and result["optimizer"] == "adam"
    assert run["samples_per_s"] > 0 and run["steps"] == 3 and run["step_path"] == "eager"
    assert run["train_flops_per_sample"] > 0 and run["mfu_vs_measured_bf16_matmul"] > 0
    assert run["peak_memory_gb"] > 0
    families = run["profile"]["families"]
    assert sum(families.values()) == pytest.approx(1.0)
    assert {"gemm", "embedding_fwd", "embedding_bwd", "optimizer"} <= set(families)
    study = result["auc"]["batches"]["128"]
    assert study["chosen"] == {"lr": 0.003, "sparse": "dense", "sparse_lr": 0.0, "warmup": 0.05}
    assert "test_auc" not in study["tuning"][0] and study["paired"] == []  # chosen on validation; --seeds 0


def test_the_optimizer_flag_reaches_the_training_config():
    with pytest.raises(ValueError, match="optimizer"):
        w3.main(["--device", "cpu", "--quick", "--batch-sizes", "64", "--optimizer", "rowwise_nothing"])


def test_counted_training_flops_of_w2_match_the_workloads_formula():
    trainer = Trainer(MultiTaskModel(W2.model_config(), seed=0), w3.TrainConfig(precision="fp32", progress=False))
    data = w3.make_data(W2, 256, seed=0)
    counted = w3.train_flops_per_sample(trainer, data)
    assert counted == pytest.approx(W2.train_flops(), rel=0.05)


def test_w3_tables_are_the_mlperf_cardinalities_scaled_down():
    full = w3.w3_cardinalities(1)
    assert full == w3.MLPERF_CARDINALITIES and sum(full) > 200_000_000
    scaled = w3.w3_cardinalities(20)
    assert max(scaled) == 2_000_000 and 10_000_000 < sum(scaled) < 10_500_000
    assert min(scaled) == 3  # a 3-row table stays whole


def test_w3_labels_come_from_a_fixed_teacher_and_are_learnable():
    vocab = [50] * 26
    a, b = w3.w3_data(vocab, 4000, seed=1), w3.w3_data(vocab, 4000, seed=1)
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)
    assert a.labels.shape == (4000, 3) and int(a.sparse.max()) < 50
    rates = a.labels.mean(0)
    assert ((rates > 0.05) & (rates < 0.6)).all()
    # the teacher is the same for another seed: the label rate of one id value agrees across seeds
    c = w3.w3_data(vocab, 4000, seed=2)
    assert abs(float(a.labels[:, 0].mean() - c.labels[:, 0].mean())) < 0.05


@pytest.mark.parametrize(
    "name,family",
    [
        ("void at::native::(anonymous namespace)::indexSelectLargeIndex<float>", "embedding_fwd"),
        ("void at::native::embedding_backward_feature_kernel<float>", "embedding_bwd"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("Memcpy HtoD (Pinned -> Device)", "copies"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ],
)
def test_kernel_families(name, family):
    assert w3.family(name) == family


def test_a_diverging_lr_of_the_sweep_is_recorded_and_the_best_other_one_kept(tmp_path):
    out = tmp_path / "w2.json"
    w3.main(["--device", "cpu", "--quick", "--workload", "W3", "--batch-sizes", "64", "--profile-steps", "0",
             "--lrs", "64=1e9,0.003", "--json", str(out)])  # fmt: skip
    study = json.loads(out.read_text())["auc"]["batches"]["64"]
    assert "diverged" in study["tuning"][0] and "train.lr" in study["tuning"][0]["diverged"]
    assert study["chosen"]["lr"] == 0.003


def _args(**flags):
    return w3.argparse.Namespace(**{"sparse": "dense", "sparse_lr": 0.0, **flags})


def test_a_grid_is_parsed_into_lr_x_warmup_x_table_configurations():
    batch, grid = w3.parse_grid("4096:lr=0.001,0.002;sparse=dense,rowwise_adagrad;sparse_lr=0.02,0.05", _args())
    assert batch == 4096 and grid["warmup"] == [0.05]
    configs = w3.grid_configs(grid)
    assert len(configs) == 2 * (1 + 2)  # Adam on the table takes no table lr
    assert w3.RunConfig(0.002, "rowwise_adagrad", 0.05) in configs and w3.RunConfig(0.001, "dense") in configs
    with pytest.raises(SystemExit, match="sparse=adagrad"):
        w3.parse_grid("4096:lr=0.001;sparse=adagrad", _args())
    with pytest.raises(SystemExit, match="lr=V"):
        w3.parse_grid("4096:sparse=dense", _args())


def test_batch_sizes_with_different_search_spaces_are_refused():
    small = w3.parse_grid("512:lr=0.001,0.002;sparse=dense,rowwise_adagrad;sparse_lr=0.02", _args())[1]
    wider = w3.parse_grid("8192:lr=0.004,0.008,0.016;sparse=dense,rowwise_adagrad;sparse_lr=0.1", _args())[1]
    other = w3.parse_grid("8192:lr=0.004,0.008;sparse=dense;sparse_lr=0.1", _args())[1]
    same = w3.parse_grid("8192:lr=0.004,0.008;sparse=dense,rowwise_adagrad;sparse_lr=0.1", _args())[1]
    w3.check_same_search_space({512: small, 8192: same})
    with pytest.raises(SystemExit, match="lr="):
        w3.check_same_search_space({512: small, 8192: wider})
    with pytest.raises(SystemExit, match="sparse="):
        w3.check_same_search_space({512: small, 8192: other})


def test_a_choice_at_the_end_of_its_grid_is_flagged():
    grid = w3.parse_grid("8192:lr=0.004,0.008,0.016;sparse=dense,rowwise_adagrad;sparse_lr=0.05,0.1", _args())[1]
    assert w3.grid_edges(grid, w3.RunConfig(0.008, "rowwise_adagrad", 0.1)) == [
        "sparse_lr 0.1 is the largest of [0.05, 0.1]"
    ]
    assert w3.grid_edges(grid, w3.RunConfig(0.004, "dense")) == ["lr 0.004 is the smallest of [0.004, 0.008, 0.016]"]
    assert w3.grid_edges(grid, w3.RunConfig(0.008, "dense")) == []  # a table lr is no knob of Adam on the table


def _runs(aucs, diverged=()):
    return [
        {"seed": s, "diverged": "loss exploded"} if s in diverged else {"seed": s, "test_auc": {"auc/t0": a}}
        for s, a in enumerate(aucs, start=1)
    ]


def test_a_known_paired_shortfall_is_found_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0.75, 0.002, 12)  # shared by both batch sizes of a seed: what pairing removes
    small = seed_effect + rng.normal(0, 0.0003, 12)
    large = seed_effect - 0.004 + rng.normal(0, 0.0003, 12)
    result = w3.compare_batches(_runs(small), _runs(large), n_boot=4000)
    task = result["tasks"]["auc/t0"]
    assert task["shortfall"]["estimate"] == pytest.approx(0.004, abs=0.0004)
    assert task["shortfall"]["low"] < 0.004 < task["shortfall"]["high"] and task["shortfall"]["low"] > 0.002
    assert task["interval_says"] == "small batch better" and task["interval_reliable"]
    assert not task["met"] and not task["upper_within_target"] and not result["met"]
    assert task["small"]["mean"] - task["large"]["mean"] == pytest.approx(task["shortfall"]["estimate"])


def test_no_shortfall_gives_an_interval_spanning_zero_not_resolvable_and_met():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0.75, 0.002, 10)
    small, large = seed_effect + rng.normal(0, 0.0005, 10), seed_effect + rng.normal(0, 0.0005, 10)
    result = w3.compare_batches(_runs(small), _runs(large), n_boot=4000)
    task = result["tasks"]["auc/t0"]
    assert task["shortfall"]["low"] < 0 < task["shortfall"]["high"]
    assert task["interval_says"] == "not resolvable" and task["upper_within_target"]
    assert task["met"] and result["met"]


def test_diverged_runs_are_counted_left_out_of_the_pairs_and_fail_the_target():
    small, large = [0.750, 0.751, 0.752, 0.749], [0.751, 0.0, 0.752, 0.750]
    result = w3.compare_batches(_runs(small), _runs(large, diverged={2}), n_boot=1000)
    assert result["pairs"] == 3 and result["failures"]["large"]["diverged"] == 1
    assert result["failures"]["large"]["rate"] == 0.25 and result["failures"]["small"]["diverged"] == 0
    task = result["tasks"]["auc/t0"]
    assert task["small"]["n"] == 4 and task["large"]["n"] == 3  # each side's mean over its finished runs
    assert task["shortfall"]["estimate"] <= 0.002 and not task["met"]  # a large batch that diverges is no match
    assert not task["interval_reliable"]  # 3 pairs: fewer than MIN_PAIRS
