"""MAML's sinusoid regression (Finn et al. 2017, Section 5.1): the task sampler, MAML with loss=mse, the pretrained
baseline, the configs and the presets (which tests/test_presets.py leaves to this file)."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import group_choices
from fewshot import engine
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.pretrain import Pretrained
from fewshot.data.base import DataError
from fewshot.data.sinusoid import SinusoidTasks, load_sinusoid
from fewshot.errors import FewshotError
from fewshot.models.backbones import MLP
from fewshot.train import run as train_run

SINUSOID_PRESETS = [p for p in group_choices("experiment") if "_sinusoid_" in p]
mlp40 = functools.partial(MLP, in_channels=1, image_size=1, sizes=[40, 40], batch_norm=False)


@contextlib.contextmanager
def one_thread():
    """The MLP is tiny: one intra-op thread is several times faster than two that wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- tasks ---------------------------------------------------------------------------------------------


def test_sampler_shapes_ranges_and_ground_truth():
    sampler = load_sinusoid().sampler("train", 1, 10, 7, device="cpu", seed=0)
    episode, amplitude, phase = sampler.sample_with_params(500)
    assert episode.support_x.shape == episode.support_y.shape == (500, 10, 1)
    assert episode.query_x.shape == episode.query_y.shape == (500, 7, 1)
    assert episode.support_y.dtype == torch.float32 and episode.tasks == 500 and episode.ways == 1
    assert amplitude.shape == phase.shape == (500,)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.max() - amplitude.min() > 4.5
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.max() - phase.min() > 3.0
    x = torch.cat([episode.support_x, episode.query_x], 1)
    y = torch.cat([episode.support_y, episode.query_y], 1)
    assert -5 <= x.min() and x.max() <= 5 and x.max() - x.min() > 9.9
    torch.testing.assert_close(y, SinusoidTasks.function(x, amplitude.view(-1, 1, 1), phase.view(-1, 1, 1)))
    assert (sampler.last_amplitude is amplitude) and (sampler.last_phase is phase)


def test_sampler_is_deterministic_per_seed_and_resumable():
    tasks = load_sinusoid()
    a = tasks.sampler("train", 1, 5, 5, "cpu", seed=3).sample(4)
    b = tasks.sampler("train", 1, 5, 5, "cpu", seed=3).sample(4)
    c = tasks.sampler("train", 1, 5, 5, "cpu", seed=4).sample(4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    s = tasks.sampler("val", 1, 5, 5, "cpu", seed=0)
    s.sample(2)
    state = s.state_dict()
    nxt = s.sample(3)
    s.load_state_dict(state)
    assert torch.equal(s.sample(3).query_x, nxt.query_x)


def test_custom_ranges_and_refused_shapes():
    tasks = load_sinusoid(amplitude=[1.0, 1.0], phase=[0.5, 0.5], x_range=[0.0, 1.0])
    episode, amplitude, phase = tasks.sampler("test", 1, 3, 2, "cpu", 0).sample_with_params(8)
    assert torch.all(amplitude == 1.0) and torch.all(phase == 0.5) and episode.support_x.min() >= 0
    with pytest.raises(DataError, match="episode.ways=2: sinusoid regression has one output"):
        tasks.check_episode("train", 2, 5, 5)
    with pytest.raises(DataError, match="episode.shots=0"):
        tasks.check_episode("train", 1, 0, 5)
    with pytest.raises(DataError, match="episode.queries=0"):
        tasks.sampler("test", 1, 5, 0, "cpu", 0)
    with pytest.raises(DataError, match="low <= high"):
        load_sinusoid(amplitude=[5.0, 0.1])


def test_mlp_without_batch_norm_is_the_papers_regressor():
    net = mlp40(out_features=1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == (1 * 40 + 40) + (40 * 40 + 40) + (40 + 1)
    assert net(torch.zeros(7, 1)).shape == (7, 1)
    with_bn = MLP(in_channels=1, image_size=1, out_features=1, sizes=[40, 40])  # the default keeps BatchNorm
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in with_bn.modules()) == 2


# ---- MAML with loss=mse and the pretrained baseline ------------------------------------------------------


def test_maml_mse_outputs_and_step_zero_is_the_unadapted_net():
    torch.manual_seed(0)
    algo = MAML(mlp40, 1, inner_lr=0.01, eval_inner_steps=10, loss="mse")
    episode = load_sinusoid().sampler("test", 1, 10, 100, "cpu", 0).sample(6)
    out = algo(episode, train=False)
    assert out.acc is None and out.step_acc is None and out.metric == "mse"
    assert out.mse.shape == (6,) and out.step_mse.shape == (6, 11)
    with torch.no_grad():
        before = (algo.net(episode.query_x.reshape(-1, 1)).view(6, 100, 1) - episode.query_y).pow(2).mean((1, 2))
    torch.testing.assert_close(out.step_mse[:, 0], before)
    adapted = algo.adapt(episode.support_x[0], episode.support_y[0], steps=10)
    after = F.mse_loss(functional_call(algo.net, adapted, (episode.query_x[0],)), episode.query_y[0])
    torch.testing.assert_close(out.mse[0], after, rtol=1e-4, atol=1e-5)
    train = algo(episode, train=True)
    assert train.acc is None and train.mse.shape == (6,) and train.loss.requires_grad
    with pytest.raises(ValueError, match="loss must be one of"):
        MAML(mlp40, 1, loss="l1")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_mse_strategies_give_the_same_meta_gradient(first_order):
    episode = load_sinusoid().sampler("train", 1, 10, 10, "cpu", 1).sample(5)
    grads = {}
    for strategy, chunk in (("loop", None), ("vmap", None), ("vmap", 2)):
        torch.manual_seed(0)
        algo = MAML(
            mlp40,
            1,
            inner_lr=0.01,
            inner_steps=2,
            loss="mse",
            first_order=first_order,
            strategy=strategy,
            chunk_size=chunk,
        )
        algo(episode, train=True).loss.backward()
        grads[(strategy, chunk)] = [p.grad for p in algo.parameters()]
        assert all(g.abs().max() > 0 for g in grads[(strategy, chunk)])
    for other in list(grads)[1:]:
        for a, b in zip(grads[("loop", None)], grads[other]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def meta_train(algo, iterations: int, shots: int = 10, seed: int = 0):
    sampler = load_sinusoid().sampler("train", 1, shots, shots, "cpu", seed)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    for _ in range(iterations):
        loss = algo(sampler.sample(25), train=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = load_sinusoid().sampler("test", 1, shots, 100, "cpu", 2)
    return torch.cat([algo(test.sample(50), train=False).step_mse for _ in range(4)]).mean(0)  # 200 tasks


def test_maml_learns_to_adapt_and_beats_the_pretrained_baseline():
    """300 meta-iterations of 25 tasks, K=10, one step of 0.01 (about 6 s). Measured on 200 test tasks, seeds 0-3:
    MAML's MSE before adaptation / after 1 step / after 10 steps 2.85-3.03 / 2.18-2.44 / 1.73-2.03 (ratios to step 0:
    0.76-0.81 and 0.61-0.67); the pretrained net with the same budget 3.02-3.09 / 2.77-2.90 / 2.59-2.84 (0.91-0.94,
    0.86-0.92), an untrained net 0.89-0.95 and 0.90-0.95. A meta-objective taken at the unadapted weights (the inner
    step lost) is plain pretraining on the query points, so it cannot pass the margins below."""
    with one_thread():
        torch.manual_seed(0)
        maml = meta_train(
            MAML(mlp40, 1, inner_lr=0.01, inner_steps=1, eval_inner_steps=10, loss="mse", strategy="vmap"), 300
        )
        torch.manual_seed(0)
        pretrained = meta_train(Pretrained(mlp40, 1, inner_lr=0.01, eval_inner_steps=10, strategy="vmap"), 300)
    print(f"MAML step MSE {maml[[0, 1, 10]].tolist()}, pretrained {pretrained[[0, 1, 10]].tolist()}")
    assert maml[1] < 0.86 * maml[0], maml  # one step of 0.01 already helps a lot
    assert maml[10] < 0.75 * maml[0], maml  # and it keeps improving (Figure 3)
    assert maml[1] < pretrained[1] - 0.25 and maml[10] < pretrained[10] - 0.4, (maml, pretrained)
    assert pretrained[1] > 0.88 * pretrained[0], pretrained  # the baseline barely moves with one step


def test_pretrained_trains_on_all_points_and_eval_leaves_the_weights_alone():
    torch.manual_seed(0)
    algo = Pretrained(mlp40, 1, inner_lr=0.01, eval_inner_steps=3)
    episode = load_sinusoid().sampler("train", 1, 5, 5, "cpu", 0).sample(4)
    out = algo(episode, train=True)
    x = torch.cat([episode.support_x, episode.query_x], 1)
    y = torch.cat([episode.support_y, episode.query_y], 1)
    with torch.no_grad():
        expected = (algo.net(x.reshape(-1, 1)).view(4, 10, 1) - y).pow(2).mean((1, 2))
    torch.testing.assert_close(out.mse, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in algo.parameters())
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    test = algo(episode, train=False)
    assert test.step_mse.shape == (4, 4) and test.acc is None
    assert all(torch.equal(before[k], v) for k, v in algo.state_dict().items())


# ---- configs, presets and the engine -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset=sinusoid", "backbone=mlp_sinusoid", "algo=maml", "algo.loss=mse", "episode.ways=1"],
        ["dataset=sinusoid", "backbone=mlp_sinusoid", "algo=pretrain", "episode.ways=1"],
        *[[f"experiment={p}"] for p in SINUSOID_PRESETS],
    ],
)
def test_configs_compose_and_build(compose_cfg, overrides):
    cfg = compose_cfg("train", overrides + ["device=cpu"])
    run = engine.build(cfg)
    assert isinstance(run.dataset, SinusoidTasks) and run.algo.loss == "mse"
    assert sum(p.numel() for p in run.algo.parameters()) == 1761  # MLP 1-40-40-1, no BatchNorm


def test_every_sinusoid_preset_follows_the_paper(compose_cfg):
    assert set(SINUSOID_PRESETS) == {f"{a}_sinusoid_k{k}" for a in ("maml", "pretrain") for k in (5, 10)}
    for preset in SINUSOID_PRESETS:
        cfg = compose_cfg("train", [f"experiment={preset}"])
        k = int(preset.rsplit("_k", 1)[1])
        assert cfg.name == preset and cfg.dataset.name == "sinusoid" and cfg.backbone.name == "mlp_sinusoid"
        assert not cfg.backbone.batch_norm and list(cfg.backbone.sizes) == [40, 40]
        assert list(cfg.dataset.amplitude) == [0.1, 5.0] and list(cfg.dataset.x_range) == [-5.0, 5.0]
        assert math.isclose(cfg.dataset.phase[1], math.pi)
        assert (cfg.episode.ways, cfg.episode.shots, cfg.episode.queries) == (1, k, k)
        assert (cfg.eval.episodes, cfg.eval.queries) == (600, 100)
        assert (cfg.trainer.iterations, cfg.trainer.meta_batch_size, cfg.trainer.meta_lr) == (70000, 25, 0.001)
        assert (cfg.algo.inner_lr, cfg.algo.eval_inner_steps, cfg.algo.loss) == (0.01, 10, "mse")
        assert "Section 5.1" in cfg.paper.source and cfg.paper.acc is None
        if cfg.algo.name == "maml":
            assert cfg.algo.inner_steps == 1 and not cfg.algo.first_order


@pytest.mark.parametrize("preset", SINUSOID_PRESETS)
def test_sinusoid_preset_runs_one_smoke_iteration(compose_cfg, tmp_path, preset):
    cfg = compose_cfg(
        "train",
        [
            f"experiment={preset}",
            "device=cpu",
            "trainer.iterations=1",
            "trainer.meta_batch_size=2",
            "trainer.val_episodes=2",
            "eval.episodes=3",
            "eval.meta_batch_size=2",
        ],
    )
    results = train_run(cfg, tmp_path)
    test = results["test"]
    assert results["name"] == preset and results["ways"] == 1 and "acc_mean" not in test
    assert test["episodes"] == 3 and math.isfinite(test["mse_mean"]) and len(test["step_mse"]) == 11
    assert math.isclose(test["step_mse"][-1], test["mse_mean"], rel_tol=1e-6)
    assert "val_mse" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert (tmp_path / "learning_curve.png").is_file() and "MSE" in (tmp_path / "results.md").read_text()


def test_ways_check_applies_to_classification_only(compose_cfg):
    engine.build(compose_cfg("train", ["experiment=maml_sinusoid_k5", "device=cpu"]))  # ways=1 is regression's
    with pytest.raises(FewshotError, match="a classification task needs at least 2 ways"):
        engine.build(compose_cfg("train", ["dataset=synthetic", "episode.ways=1", "device=cpu"]))
    with pytest.raises(FewshotError, match="episode.ways=0: must be a positive number"):
        engine.build(compose_cfg("train", ["experiment=maml_sinusoid_k5", "episode.ways=0", "device=cpu"]))


def test_sinusoids_and_image_datasets_are_task_sources(compose_cfg):
    from fewshot.data.dataset import TaskSource
    from fewshot.engine import build

    for overrides in (["dataset=sinusoid"], ["dataset=synthetic"]):
        assert isinstance(build(compose_cfg("train", [*overrides, "device=cpu"])).dataset, TaskSource)
