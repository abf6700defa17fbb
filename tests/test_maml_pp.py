"""MAML++ on CPU: its loss and every meta-gradient (weights, per-step step sizes, per-step BatchNorm rows) equal a
plain retelling of AntreasAntoniou/HowToTrainYourMAMLPytorch's forward (few_shot_learning_system.py, with the
network written out layer by layer as meta_neural_network_architectures.py's VGGReLUNormNetwork runs it), in both
strategies, with the multi-step loss on and off and first or second order; the MSL weights equal the reference's
get_per_step_loss_importance_vector; the epoch counter resumes exactly; and it learns Omniglot."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_learns
from fewshot.algorithms.maml_pp import MAMLPlusPlus, loss_weights
from fewshot.models.backbones import Conv4
from test_algorithms import meta_grads, random_episode

WAYS, STEPS, MSL_EPOCHS, EPOCH = 5, 3, 4, 10  # EPOCH: meta-iterations per epoch


def reference_importance(epoch: int, steps: int, msl_epochs: int) -> np.ndarray:
    """get_per_step_loss_importance_vector, as the reference writes it."""
    loss_weights = np.ones(shape=(steps,)) * (1.0 / steps)
    decay_rate = 1.0 / steps / msl_epochs
    min_value_for_non_final_losses = 0.03 / steps
    for i in range(len(loss_weights) - 1):
        loss_weights[i] = np.maximum(loss_weights[i] - (epoch * decay_rate), min_value_for_non_final_losses)
    loss_weights[-1] = np.minimum(
        loss_weights[-1] + (epoch * (steps - 1) * decay_rate), 1.0 - ((steps - 1) * min_value_for_non_final_losses)
    )
    return loss_weights


def make(**kw) -> MAMLPlusPlus:
    net = functools.partial(Conv4, in_channels=1, image_size=28, hidden=8, max_pool=True, leaky_slope=0.01)
    kw = {**dict(inner_steps=STEPS, msl_epochs=MSL_EPOCHS, epoch_iterations=EPOCH), **kw}
    algo = MAMLPlusPlus(net, WAYS, **kw).double()
    with torch.no_grad():  # rows and step sizes apart, so a mix-up of steps or layers shows
        for p in algo.bn_steps:
            p.add_(torch.randn_like(p) * 0.3)
        for lr in algo.lrs:
            lr.add_(torch.rand_like(lr) * 0.2)
    return algo


def reference_loss(algo: MAMLPlusPlus, episode, epoch: int, second_order: bool) -> torch.Tensor:
    """The reference's forward over the tasks: 4 x [conv 3x3 pad 1, F.batch_norm(training=True) with step row
    num_step, leaky ReLU 0.01, max-pool 2], linear; inner update w - lr[w][step] * g on every non-BatchNorm weight;
    the query loss after each step weighted by the importance vector while epoch < msl_epochs, else the last step's
    alone; the sum over steps per task, the mean over tasks."""
    bn = dict(zip(algo.bn_names, algo.bn_steps))
    lrs = dict(zip(algo.inner_names, algo.lrs))

    def net(w, x, step):
        for block in range(4):
            conv, norm = f"features.{4 * block}", f"features.{4 * block + 1}"
            x = F.conv2d(x, w[f"{conv}.weight"], w[f"{conv}.bias"], padding=1)
            x = F.batch_norm(x, None, None, bn[f"{norm}.weight"][step], bn[f"{norm}.bias"][step], training=True)
            x = F.max_pool2d(F.leaky_relu(x, 0.01), 2)
        return F.linear(x.flatten(1), w["head.weight"], w["head.bias"])

    importance = torch.tensor(reference_importance(epoch, STEPS, MSL_EPOCHS), dtype=torch.float32)
    total = []
    for sx, sy, qx, qy in zip(episode.support_x, episode.support_y, episode.query_x, episode.query_y):
        w = {k: p for k, p in algo.net.named_parameters()}
        task_losses = []
        for step in range(STEPS):
            grads = torch.autograd.grad(
                F.cross_entropy(net(w, sx, step), sy), tuple(w.values()), create_graph=second_order
            )
            w = {k: v - lrs[k][step] * g for (k, v), g in zip(w.items(), grads)}
            if epoch < MSL_EPOCHS:
                task_losses.append(importance[step] * F.cross_entropy(net(w, qx, step), qy))
            elif step == STEPS - 1:
                task_losses.append(F.cross_entropy(net(w, qx, step), qy))
        total.append(torch.sum(torch.stack(task_losses)))
    return torch.mean(torch.stack(total))


@pytest.mark.parametrize("epoch", range(0, 13))
def test_msl_weights_are_the_reference_importance_vector(epoch):
    ours = loss_weights(torch.tensor(epoch), 5, 10)
    want = reference_importance(epoch, 5, 10) if epoch < 10 else np.eye(5)[-1]
    assert torch.equal(ours, torch.tensor(want, dtype=torch.float32))
    assert ours.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("epoch", [0, 2, 5], ids=["msl-epoch-0", "msl-epoch-2", "after-msl"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_meta_gradient_matches_the_reference(strategy, epoch, first_order):
    torch.manual_seed(0)
    ours = make(strategy=strategy, first_order=first_order)
    episode = random_episode(tasks=3, dtype=torch.float64, seed=1)
    ours.meta_iterations.fill_(epoch * EPOCH + EPOCH - 1)  # the epoch's last iteration: the next is another epoch's
    loss, grads = meta_grads(ours, episode)
    assert ours.meta_iterations.item() == (epoch + 1) * EPOCH  # one meta-iteration counted
    ours.zero_grad(set_to_none=True)
    want = reference_loss(ours, episode, epoch, second_order=not first_order)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{k}: {m}")
    assert grads["lrs.0"].abs().sum() > 0 and grads["bn_steps.0"][-1].abs().sum() > 0


def test_derivative_order_anneals_at_its_epoch():
    """first_order_epochs=2: the first-order meta-gradient in epochs 0 and 1, the second-order one from epoch 2."""
    episode = random_episode(tasks=2, dtype=torch.float64, seed=4)

    def grads(epoch, **kw):
        torch.manual_seed(0)
        algo = make(strategy="loop", **kw)
        algo.meta_iterations.fill_(epoch * EPOCH)
        return meta_grads(algo, episode)[1]

    for epoch, order in ((1, True), (2, False)):
        annealed, plain = grads(epoch, first_order_epochs=2), grads(epoch, first_order=order)
        assert all(torch.equal(annealed[k], plain[k]) for k in plain), epoch
    assert not torch.equal(grads(1, first_order_epochs=2)["lrs.0"], grads(2)["lrs.0"])  # the two orders differ


def test_batch_norm_is_per_step_and_never_adapted():
    torch.manual_seed(0)
    algo = make()
    assert all(m.weight is None and m.bias is None for m in algo.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert [p.shape for p in algo.bn_steps] == [(STEPS, 8)] * 8 and len(algo.lrs) == len(algo.inner_names) == 10
    assert algo.inner_names == [f"features.{4 * b}.{p}" for b in range(4) for p in ("weight", "bias")] + [
        "head.weight",
        "head.bias",
    ]
    shared = make(per_step_bn=False)
    assert len(shared.bn_steps) == 0 and sum(1 for k, _ in shared.net.named_parameters() if k in shared.bn_names) == 8


def test_test_reports_each_step_and_counts_nothing():
    torch.manual_seed(0)
    algo = make()
    episode = random_episode(tasks=4, dtype=torch.float64, seed=5)
    out = algo(episode, train=False)
    assert out.step_score.shape == (4, STEPS + 1) and torch.equal(out.score, out.step_score[:, -1])
    assert algo.meta_iterations.item() == 0
    with torch.no_grad():  # before adapting: the plain net with BatchNorm row 0
        rows = {k: p[0] for k, p in zip(algo.bn_names, algo.bn_steps)}
        logits = torch.stack([torch.func.functional_call(algo.net, rows, (x,)) for x in episode.query_x])
    torch.testing.assert_close(out.step_score[:, 0], (logits.argmax(-1) == episode.query_y).double().mean(-1).float())


def test_graph_phase_changes_where_the_flow_does():
    """graph_phase(iteration): (MSL, second order) from the meta-iterations done before it, so a captured step is
    captured again exactly at the epoch where MSL ends or the order changes; None where nothing ever changes."""
    msl = make()  # MSL_EPOCHS epochs of EPOCH iterations
    last_msl = MSL_EPOCHS * EPOCH
    assert msl.graph_phase(1) == msl.graph_phase(last_msl) == (True, True)
    assert msl.graph_phase(last_msl + 1) == msl.graph_phase(10**6) == (False, True)
    annealed = make(msl_epochs=0, first_order_epochs=2)
    assert annealed.graph_phase(2 * EPOCH) == (False, False) and annealed.graph_phase(2 * EPOCH + 1) == (False, True)
    for kw in (dict(msl_epochs=0), dict(inner_steps=1), dict(msl_epochs=0, first_order=True, first_order_epochs=2)):
        assert make(**kw).graph_phase(1) is None, kw
    # the flow an eager step takes (from the device counter) is the one graph_phase names for that iteration
    for it in (last_msl, last_msl + 1):
        msl.meta_iterations.fill_(it - 1)
        assert msl._flow(msl._epoch()) == msl.graph_phase(it), it


@pytest.mark.parametrize(
    "kw", [dict(inner_steps=0), dict(msl_epochs=-1), dict(epoch_iterations=0), dict(first_order_epochs=-2)]
)
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="MAML\\+\\+ needs"):
        make(**kw)


# ---- real learning on Omniglot ------------------------------------------------------------------------------------

# 5-way 1-shot on CPU, the preset's protocol but a 16-filter net, 5 queries per class, 100 meta-iterations of 4 tasks
# at a meta lr of 3e-3 (cosine-annealed to 1e-5) with the multi-step loss over the first 2 of 5 epochs of 20, 100 test
# tasks. Measured on the 2-core dev machine (one thread, beside a training run, about 90 s): untrained 57.3% (5 steps
# at 0.1 already fit a 1-shot task a good way), trained 74.0 ± 2.4%; at the preset's meta lr 1e-3, 63.6 ± 2.3%.
OMNIGLOT = [
    "experiment=maml_pp_omniglot_5w1s",
    "backbone.hidden=16",
    "device=cpu",
    "episode.queries=5",
    "trainer.meta_batch_size=4",
    "trainer.iterations=100",
    "trainer.meta_lr=0.003",
    "trainer.val_every=100",
    "trainer.val_episodes=20",
    "algo.epoch_iterations=20",
    "algo.msl_epochs=2",
    "eval.episodes=100",
]


@pytest.mark.slow
@pytest.mark.omniglot
def test_learns_omniglot(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28):
    cfg = compose_cfg("train", [*OMNIGLOT, f"data_root={omniglot_root.parent}", f"cache_dir={omniglot_cache_dir}"])
    assert_learns(cfg, tmp_path, "maml_pp omniglot 5w1s", floor=0.65, gain=0.12)


def test_bench_descendants_closures_run():
    """scripts/bench_descendants.py's closures, once each on a CPU (make bench times them)."""
    from argparse import Namespace

    from conftest import load_script

    bench = load_script("bench_descendants")
    args = Namespace(block=1, graph=True)  # the graph step runs eagerly on a CPU
    for make in (bench.meta_sgd_setting, bench.maml_pp_setting):
        for name, step in make(torch.device("cpu"), args).items():
            assert step() > 0, name
