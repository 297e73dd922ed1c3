"""Task balancing (train/balancing.py): each method against hand-computed values, then every method through the
one step with masked labels, sample weights, bf16, checkpoint/resume, the ensemble and data-parallel training."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel
from mtrank.train import Ensemble, EnsembleData, Trainer
from mtrank.train.balancing import (
    cagrad,
    dwa_weights,
    famo_weights,
    gradnorm_targets,
    make_balancer,
    pcgrad,
    uncertainty_optimum,
)
from mtrank.train.distributed import shutdown
from mtrank.train.losses import batch_losses

METHODS = ["fixed", "uncertainty", "dwa", "famo", "gradnorm", "pcgrad", "cagrad"]
TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]


def _config(block: str = "mmoe", **model) -> ModelConfig:
    return ModelConfig(
        inputs={"num_dense": 100},
        tasks=TASKS,
        block={"type": block, "num_experts": 3},
        experts={"hidden": [8]},
        towers={"hidden": [4]},
        **model,
    )


def _train_config(method: str, **overrides) -> TrainConfig:
    balancing = {"type": method, **({"every": 3} if method == "dwa" else {})}
    return TrainConfig(**{"batch_size": 32, "lr": 1e-2, "progress": False, "balancing": balancing, **overrides})


# ------------------------------------------------------------------------------------------ hand-computed values


def test_pcgrad_projects_two_conflicting_gradients_off_each_other():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1); sum = (0.5, 1.5)
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert pcgrad(grads).tolist() == [0.5, 1.5]


def test_pcgrad_leaves_agreeing_gradients_alone_and_treats_runs_apart():
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert pcgrad(agreeing).tolist() == [2.0, 1.0]
    assert pcgrad(torch.stack([agreeing, conflicting])).tolist() == [[2.0, 1.0], [0.5, 1.5]]


def test_pcgrad_with_three_tasks_matches_the_sequential_reference_in_its_random_order():
    grads = torch.randn(3, 6)
    generator = torch.Generator().manual_seed(3)
    got = pcgrad(grads, generator)
    generator.manual_seed(3)
    expected = torch.zeros(6)
    for i in range(3):  # Yu et al.'s reference loop: g_i against the original g_j, in a random order
        g = grads[i].clone()
        for j in torch.randperm(3, generator=generator).tolist():
            if j != i and torch.dot(g, grads[j]) < 0:
                g -= torch.dot(g, grads[j]) / grads[j].norm() ** 2 * grads[j]
        expected += g
    torch.testing.assert_close(got, expected)


def test_cagrad_with_radius_zero_is_the_sum_of_the_task_gradients():
    grads = torch.randn(2, 3, 10)
    torch.testing.assert_close(cagrad(grads, c=0.0), grads.sum(-2))


def test_cagrad_on_two_orthogonal_unit_gradients():
    # g0 = (.5, .5), |g0| = 1/sqrt 2; by symmetry w = (.5, .5), g_w = g0; lambda = c |g0| / |g_w| = c = .5
    # d = (g0 + .5 g0) / (1 + .25) = (.6, .6); times K = 2 -> (1.2, 1.2)
    torch.testing.assert_close(cagrad(torch.eye(2), c=0.5), torch.tensor([1.2, 1.2]), atol=1e-5, rtol=0)


def test_cagrad_improves_the_worse_task_more_than_the_plain_sum():
    grads = torch.tensor([[1.0, 0.0], [-0.8, 0.3]])  # conflicting, the second much weaker along the first
    plain, balanced = grads.sum(0), cagrad(grads, c=0.5)
    assert (grads @ balanced).min() > (grads @ plain).min()


def test_uncertainty_weights_reach_the_closed_form_optimum_on_fixed_losses():
    # regression: minimise .5 e^-s L + s/2 -> s = log L; binary: e^-s L + s/2 -> s = log 2L; both m = 1 / (2L)
    binary = torch.tensor([False, True])
    losses = torch.tensor([4.0, 0.3])
    assert uncertainty_optimum(losses, binary).tolist() == pytest.approx([math.log(4.0), math.log(0.6)])
    runs = _FakeRuns(binary)
    balancer = make_balancer(TrainConfig(lr=0.05, balancing="uncertainty"), runs)
    balancer._ensure_state(losses)
    for _ in range(3000):
        balancer.observe(losses, torch.tensor([True, True]))
    torch.testing.assert_close(balancer.log_variance, uncertainty_optimum(losses, binary), atol=1e-3, rtol=0)
    torch.testing.assert_close(balancer.weights, 1 / (2 * losses), atol=1e-3, rtol=0)


def test_dwa_weights_from_a_loss_history():
    # r = L(t-1) / L(t-2) = (.5 / 1, 1 / 1); T = 2: m = 2 exp(r / 2) / sum exp(r / 2)
    w = dwa_weights(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), temperature=2.0)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    assert w.tolist() == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])  # (0.8757, 1.1244)


def test_dwa_keeps_weights_at_one_for_two_periods_then_follows_the_period_means():
    runs = _FakeRuns(torch.tensor([False, False]))
    balancer = make_balancer(TrainConfig(balancing={"type": "dwa", "every": 2, "temperature": 2.0}), runs)
    balancer.begin(steps_per_epoch=100)  # every: 2 overrides the epoch
    balancer._ensure_state(torch.ones(2))
    history = [[2.0, 1.0], [2.0, 1.0], [1.0, 1.0], [1.0, 1.0]]  # period means (2, 1) then (1, 1)
    for losses in history:
        assert balancer.weights.tolist() == [1.0, 1.0]
        balancer.observe(torch.tensor(losses), torch.tensor([True, True]))
    torch.testing.assert_close(balancer.weights, dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), 2.0))
    assert balancer.weights[1] > balancer.weights[0]  # the task whose loss did not fall gains weight


def test_dwa_period_means_skip_batches_where_a_task_has_no_label():
    runs = _FakeRuns(torch.tensor([False, False]))
    balancer = make_balancer(TrainConfig(balancing={"type": "dwa", "every": 2}), runs)
    balancer.begin(steps_per_epoch=100)
    balancer._ensure_state(torch.ones(2))
    balancer.observe(torch.tensor([3.0, 1.0]), torch.tensor([True, True]))
    balancer.observe(torch.tensor([0.0, 1.0]), torch.tensor([False, True]))  # task 1 absent: its 0 is no loss
    assert balancer.last.tolist() == [3.0, 1.0]


def test_gradnorm_targets_by_hand():
    # Ltilde = L / L0 = (.5, 1), r = Ltilde / mean = (2/3, 4/3); mean G = 1.5; alpha = 2: T = 1.5 r^2
    targets = gradnorm_targets(
        norms=torch.tensor([1.0, 2.0]),
        losses=torch.tensor([1.0, 1.0]),
        initial=torch.tensor([2.0, 1.0]),
        alpha=2.0,
        present=torch.tensor([True, True]),
    )
    torch.testing.assert_close(targets, torch.tensor([1.5 * 4 / 9, 1.5 * 16 / 9]))


def test_famo_weights_are_the_gradient_of_the_normalised_log_objective():
    logits = torch.tensor([0.0, math.log(3.0)])  # z = (.25, .75)
    losses = torch.tensor([2.0, 0.5])
    # m_k = z_k / (c L_k), c = .25 / 2 + .75 / .5 = 1.625
    w = famo_weights(logits, losses, torch.tensor([True, True]))
    assert w.tolist() == pytest.approx([0.125 / 1.625, 1.5 / 1.625], rel=1e-6)
    absent = famo_weights(logits, losses, torch.tensor([True, False]))
    assert absent.tolist() == pytest.approx([1.0, 0.0])  # c = z_0 / L_0: m_0 = 1


def test_famo_gives_weight_to_the_task_whose_loss_fell_least():
    runs = _FakeRuns(torch.tensor([False, False]))
    balancer = make_balancer(TrainConfig(balancing="famo"), runs)
    balancer._ensure_state(torch.ones(2))
    both = torch.tensor([True, True])
    for step in range(20):  # task 0's loss halves every step, task 1's stays
        balancer.observe(torch.tensor([0.5**step, 1.0]), both)
    z = torch.softmax(balancer.logits, -1)
    assert z[1] > 0.6 > 0.4 > z[0]


class _FakeRuns:
    def __init__(self, binary: torch.Tensor) -> None:
        self.binary_mask = binary
        self.task_weights = torch.ones(len(binary))
        self.task_names = [f"t{k}" for k in range(len(binary))]
        self.device = torch.device("cpu")
        self.num_runs = 1


# ------------------------------------------------------------------------------------------ at the step


def _step_gradients(method: str, data: TensorData, block: str = "mmoe") -> dict[str, torch.Tensor]:
    """The gradients one balanced backward leaves on a fresh model."""
    from mtrank.train.trainer import SingleRun

    model = MultiTaskModel(_config(block), seed=1)
    runs = SingleRun(model, torch.device("cpu"))
    balancer = make_balancer(_train_config(method), runs)
    out = model(data.dense, data.sparse)
    losses = batch_losses(out.task_logits, out.aux_loss, data.labels, runs.binary_mask, runs.task_weights, data.weights)
    balancer.backward(losses)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _reference_task_gradients(data: TensorData, block: str = "mmoe") -> list[dict[str, torch.Tensor]]:
    """Each task's gradient from its own forward and backward (the plain reference)."""
    result = []
    for k in range(2):
        model = MultiTaskModel(_config(block), seed=1)
        out = model(data.dense, data.sparse)
        losses = batch_losses(out.task_logits, out.aux_loss, data.labels, model.binary_mask, torch.ones(2))
        losses.per_task[k].backward()
        result.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return result


@pytest.mark.parametrize("block", ["mmoe", "cgc"])
def test_pcgrad_at_the_step_rewrites_only_the_shared_gradient(block):
    data = make_synthetic(n=64, correlation=-0.5, seed=0)
    g = _reference_task_gradients(data, block)
    got = _step_gradients("pcgrad", data, block)
    shared = [n for n in got if n.startswith("block.levels.0.experts")]
    towers = [n for n in got if n.startswith("block.towers")]
    for name in towers:  # towers: the plain sum
        torch.testing.assert_close(got[name], g[0][name] + g[1][name], msg=name)
    if block == "mmoe":  # every expert shared: PCGrad on the concatenated expert gradients
        flat = torch.stack([torch.cat([g[k][n].flatten() for n in shared]) for k in range(2)])
        expected = pcgrad(flat)
        torch.testing.assert_close(torch.cat([got[n].flatten() for n in shared]), expected, atol=1e-6, rtol=1e-5)
    else:  # CGC: each task's own experts keep their plain gradient, the shared ones change
        name = "block.levels.0.experts.layers.0.weight"
        reached = torch.stack([g[k][name].flatten(1).ne(0).any(1) for k in range(2)])  # (K, E)
        own = reached.sum(0) == 1
        assert own.sum() >= 2 and (~own).sum() >= 1
        plain = g[0][name] + g[1][name]
        torch.testing.assert_close(got[name][own], plain[own])
        assert not torch.allclose(got[name][~own], plain[~own])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_masked_labels_and_sample_weights_gives_finite_gradients(method):
    data = make_synthetic(n=64, seed=0)
    labels = data.labels.clone()
    labels[::2, 0] = float("nan")  # task y1 labelled on half of the rows
    weights = torch.rand(64)
    weights[1::2] = 0.0  # ... and the other half weighs 0: y1 has no usable row
    batch = TensorData(data.dense, data.sparse, labels, weights)
    grads = _step_gradients(method, batch)
    assert all(torch.isfinite(g).all() for g in grads.values())
    tower_y1 = grads["block.towers.layers.0.weight"][0]
    assert tower_y1.abs().max() == 0  # the absent task pulls nothing


def test_an_absent_task_keeps_its_learned_state():
    runs = _FakeRuns(torch.tensor([False, False]))
    balancer = make_balancer(TrainConfig(balancing="uncertainty"), runs)
    balancer._ensure_state(torch.ones(2))
    balancer.observe(torch.tensor([5.0, 0.0]), torch.tensor([True, False]))
    assert balancer.log_variance[1] == 0 and balancer.log_variance[0] != 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_in_bf16(method):
    train, valid = make_synthetic(n=256, seed=0).split((0.75, 0.25))
    model = MultiTaskModel(_config(), seed=0)
    result = Trainer(model, _train_config(method, steps=12, eval_every=6, precision="bf16")).fit(train, valid)
    assert math.isfinite(result.best_value) and result.history[-1]["train_loss"] < result.history[0]["train_loss"] * 2


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_a_checkpoint_continues_the_balanced_run_exactly(method, tmp_path):
    train, valid = make_synthetic(n=256, seed=0).split((0.75, 0.25))
    straight = MultiTaskModel(_config(), seed=0)
    Trainer(straight, _train_config(method, steps=16, eval_every=4)).fit(train, valid)
    config = _train_config(method, eval_every=4, checkpoint_dir=str(tmp_path / "ckpt"))
    first = MultiTaskModel(_config(), seed=0)
    Trainer(first, TrainConfig.from_dict({**config.to_dict(), "steps": 8})).fit(train, valid)
    resumed = MultiTaskModel(_config(), seed=0)
    trainer = Trainer(resumed, TrainConfig.from_dict({**config.to_dict(), "steps": 16}))
    result = trainer.fit(train, valid)
    assert result.resumed_from == 8
    if method != "fixed":
        assert trainer.loop.balancer.state_dict(), "the method's state was not restored"
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_another_balancing_method_is_refused(tmp_path):
    train = make_synthetic(n=128, seed=0)
    config = _train_config("uncertainty", steps=4, checkpoint_dir=str(tmp_path / "ckpt"))
    Trainer(MultiTaskModel(_config(), seed=0), config).fit(train)
    other = TrainConfig.from_dict({**config.to_dict(), "balancing": "famo", "resume": "require"})
    with pytest.raises(ValueError, match="balancing"):
        Trainer(MultiTaskModel(_config(), seed=0), other).fit(train)


@pytest.mark.parametrize("method", METHODS)
def test_an_ensemble_member_trains_as_its_run_alone(method):
    train, valid = make_synthetic(n=256, seed=0).split((0.75, 0.25))
    ensemble = Ensemble(_config(), init_seeds=[0, 1])
    ensemble.fit(EnsembleData.shared(train), EnsembleData.shared(valid), _train_config(method, steps=10, eval_every=5))
    for r, seed in enumerate([0, 1]):
        alone = MultiTaskModel(_config(), seed=seed)
        Trainer(alone, _train_config(method, steps=10, eval_every=5, seed=seed)).fit(train, valid)
        member = ensemble.member(r).state_dict()
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(member[name], value, rtol=1e-4, atol=1e-5, msg=f"{method} run {r} {name}")


def test_gradient_methods_fall_back_to_the_eager_step_and_say_why(monkeypatch):
    import mtrank.train.loop as loop_module

    monkeypatch.setattr(loop_module, "cuda_graph_plan", lambda *args: (True, "CUDA graph"))
    for method, graphed in [("famo", True), ("pcgrad", False), ("gradnorm", False)]:
        loop = Trainer(MultiTaskModel(_config(), seed=0), _train_config(method)).loop
        assert loop.cuda_graphs is graphed
        if not graphed:
            assert f"train.balancing.type='{method}'" in loop.step_path_reason
            assert "per-task gradient" in loop.step_path_reason.replace("task's gradient", "per-task gradient")


def test_conflict_measurements_join_the_history_without_changing_the_trajectory():
    train, valid = make_synthetic(n=256, seed=0).split((0.75, 0.25))
    config = _config()
    config.experts.dropout = 0.2
    plain, measured = MultiTaskModel(config, seed=0), MultiTaskModel(config, seed=0)
    Trainer(plain, _train_config("pcgrad", steps=10, eval_every=5)).fit(train, valid)
    settings = {"type": "pcgrad", "conflict_every": 2}
    result = Trainer(measured, _train_config("pcgrad", steps=10, eval_every=5, balancing=settings)).fit(train, valid)
    assert -1 <= result.history[-1]["conflict/cosine/y1~y2"] <= 1
    assert "conflict/cosine/block.levels.0.experts.layers.0/y1~y2" in result.history[-1]
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(measured.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_balancing_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="train.balancing.type.*'pcgrad'"):
        TrainConfig.from_dict({"balancing": "pcgard"}).validate()
    with pytest.raises(ConfigError, match="train.balancing.temperature"):
        TrainConfig.from_dict({"balancing": {"type": "dwa", "temperature": 0}}).validate()
    with pytest.raises(ConfigError, match="train.balancing.conflict_every"):
        TrainConfig.from_dict({"balancing": {"type": "famo", "conflict_every": -1}}).validate()


def test_surgery_refuses_a_model_without_shared_parameters():
    config = ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"type": "single_task"})
    with pytest.raises(ValueError, match="use train.balancing: fixed"):
        Trainer(MultiTaskModel(config, seed=0), _train_config("pcgrad", steps=2)).fit(make_synthetic(n=64, seed=0))


# ------------------------------------------------------------------------------------------ data-parallel


def _ddp_worker(rank: int, world: int, store: str, out: str, method: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = MultiTaskModel(_config(), seed=5)
    trainer = Trainer(model, _train_config(method, epochs=2, batch_size=40))
    trainer.fit(make_synthetic(n=480, seed=0))
    torch.save({**model.state_dict(), **trainer.loop.balancer.state_dict()}, f"{out}.{rank}")
    shutdown()
    os._exit(0)


@pytest.mark.parametrize("method", ["uncertainty", "pcgrad", "gradnorm"])
def test_two_rank_ddp_balances_like_one_process_with_twice_the_batch(method, tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out, method), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    model = MultiTaskModel(_config(), seed=5)
    trainer = Trainer(model, _train_config(method, epochs=2, batch_size=80))
    trainer.fit(make_synthetic(n=480, seed=0))
    expected = {**model.state_dict(), **trainer.loop.balancer.state_dict()}
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            for state in ranks:
                torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ funnel tasks


@pytest.mark.parametrize("funnel", [{"type": "esmm"}, {"type": "escm2", "counterfactual_weight": 0.3}])
def test_a_funnel_task_is_balanced_on_its_entire_space_loss_and_the_regulariser_is_not(funnel):
    """ESMM's CTCVR loss is task cvr's ``L_k`` (what a method weights); ESCM2's counterfactual risk joins
    ``extra`` with its own weight; the fixed-weight total is unchanged: label losses of the roots + funnel_loss."""
    from mtrank.train.losses import FunnelSpec, funnel_loss, funnel_terms, multitask_loss

    config = ModelConfig.from_dict(
        {
            "inputs": {"num_dense": 3, "vocab_sizes": [5], "embedding_dim": 2},
            "tasks": [{"name": "ctr"}, {"name": "cvr", "depends_on": "ctr", "weight": 2.0}],
            "block": "shared_bottom",
            "experts": {"hidden": [6]},
            "towers": {"hidden": [4]},
            "funnel": funnel,
        }
    )
    model = MultiTaskModel(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(16, 3, generator=gen), torch.randint(0, 5, (16, 1), generator=gen)
    click = (torch.arange(16) % 2).float()
    buy = torch.where(click == 1, (torch.arange(16) % 4 == 1).float(), torch.full((16,), math.nan))
    labels = torch.stack([click, buy], 1)
    out = model(dense, sparse)
    spec = FunnelSpec.from_config(config)
    weights = torch.tensor([1.0, 2.0])
    losses = batch_losses(out.task_logits, out.aux_loss, labels, model.binary_mask, weights, funnel=spec)
    terms = funnel_terms(out.task_logits, labels, spec)
    torch.testing.assert_close(losses.per_task[1], terms.per_task[1])  # the entire-space loss, not clicked rows
    assert losses.present.tolist() == [True, True]
    base, _ = multitask_loss(out.task_logits, labels, model.binary_mask, torch.tensor(spec.label_weights()))
    torch.testing.assert_close(losses.total, base + funnel_loss(out.task_logits, labels, spec) + out.aux_loss)
    regulariser = losses.extra - out.aux_loss
    assert (regulariser.abs() > 1e-4) == (funnel["type"] == "escm2")
    balancer = make_balancer(TrainConfig(balancing="uncertainty"), _FakeRuns(torch.tensor([True, True])))
    balancer.runs.task_weights = weights
    balancer._ensure_state(torch.ones(2))
    balancer.observe(losses.per_task.detach(), losses.present)
    assert (balancer.log_variance != 0).all()  # both tasks, the funnel task included, are weighted
