"""benchmarks/w3.py: every path (throughput, FLOPs, MFU, profile, AUC study) runs at tiny size on CPU, and its
numbers mean what they say."""

import json
import sys
from pathlib import Path

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
    study = result["auc"]["128"]
    assert study["best_lr"] == 0.003 and set(study["test_auc"]) == {"auc/t0", "auc/t1", "auc/t2"}


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
    study = json.loads(out.read_text())["auc"]["64"]
    assert "diverged" in study["runs"][0] and "train.lr" in study["runs"][0]["diverged"]
    assert study["best_lr"] == 0.003
