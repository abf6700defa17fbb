"""Reptile (Nichol et al. 2018, fewshot.algorithms.reptile): its meta-step against a plain re-telling of
openai/supervised-reptile's loop, its mini-batches, the test that leaves the weights and the inner optimizer alone,
the presets' meta step size, resume, one-line errors, and real learning on Omniglot."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_learns, load_script, straight_and_resumed
from fewshot import engine
from fewshot.algorithms.reptile import Reptile, mini_batches
from fewshot.data.base import Episode
from fewshot.models.backbones import Conv4
from fewshot.optim import make_optimizer, make_scheduler
from test_algorithms import bias_before_batch_norm

TINY = [
    "experiment=reptile_omniglot_5w1s",
    "dataset=synthetic",
    "backbone.hidden=8",
    "device=cpu",
    "algo.eval_inner_steps=3",
    "trainer.iterations=6",
    "trainer.val_every=3",
    "trainer.val_episodes=4",
    "trainer.checkpoint_every=3",
    "schedule.total_iters=6",  # the meta step's schedule of a 6-iteration run, also in the run stopped at 3
    "eval.episodes=6",
    "eval.meta_batch_size=3",
]


def small(seed: int = 0, **kwargs) -> Reptile:
    torch.manual_seed(seed)
    backbone = functools.partial(Conv4, in_channels=1, image_size=28, hidden=8, flatten=True)
    return Reptile(backbone, 5, **kwargs)


def random_episode(
    tasks: int = 3, shots: int = 2, queries: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32
) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(tasks, 5 * shots, 1, 28, 28, generator=g).to(dtype),
        torch.arange(5).repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, 5 * queries, 1, 28, 28, generator=g).to(dtype),
        torch.arange(5).repeat_interleave(queries).repeat(tasks, 1),
        ways=5,
    )


# ---- against the reference's loop -------------------------------------------------------------------------------


# openai/supervised-reptile's train_step retold in plain PyTorch: one home, scripts/bench_reptile.py, which times
# fewshot's step against it.
reference_meta_step = load_script("bench_reptile").reference_meta_step
# fewshot's test as it ran before its tasks went side by side: each task in turn through adapt() (same home).
task_loop = load_script("bench_reptile").task_loop


# A convolution's bias before BatchNorm has a gradient of zero up to rounding (BatchNorm subtracts the batch mean),
# and Adam divides that noise by its own size: these biases wander by O(inner_lr) in any implementation, the
# reference's included, and no two implementations round alike. Every other parameter is compared.
PRE_BN_BIASES = {f"features.{i}.bias" for i in (0, 3, 6, 9)}


def test_meta_step_is_the_references_and_carries_the_inner_adam_over():
    """Two meta-iterations through the engine's path (loss.backward, SGD without momentum at the meta step) give
    the reference's weights and its inner Adam's state, the second starting from the state the first left."""
    algo = small(inner_steps=4, inner_batch=3, inner_lr=0.01)
    ref = copy.deepcopy(algo.net)
    outer = torch.optim.SGD(algo.parameters(), lr=0.7, momentum=0.0)
    adam = None
    for it in range(2):
        episode = random_episode(seed=it)
        torch.manual_seed(100 + it)
        batches = mini_batches(3, 20, 4, 3, torch.device("cpu"))
        torch.manual_seed(100 + it)  # the algorithm draws the same batches
        outer.zero_grad()
        out = algo(episode, train=True)
        out.loss.backward()
        outer.step()
        adam = adam or torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        reference_meta_step(ref, episode, batches, adam, 0.7)
        m, v, step = algo.adam_state()
        assert step.item() == 12 * (it + 1)  # 3 tasks x 4 steps, never reset
        for (name, p), q, v_i in zip(algo.net.named_parameters(), ref.parameters(), v):
            if name in PRE_BN_BIASES:  # exactly 0 at the first meta-step, rounding noise after
                continue
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(v_i, adam.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9, msg=name)
    assert out.score.shape == (3,) and 0 <= out.score.min() and out.score.max() <= 1


def test_loss_is_the_mean_inner_loss_and_its_gradient_the_reptile_direction():
    # float64: the two Adams (torch.optim's and the algorithm's own) round differently, far below what is compared
    algo = small(inner_steps=2, inner_batch=5).double()
    episode = random_episode(dtype=torch.float64)
    theta = [p.detach().clone() for p in algo.parameters()]
    torch.manual_seed(3)
    batches = mini_batches(3, 20, 2, 5, torch.device("cpu"))
    # The reported loss: every inner step's mini-batch loss, before its Adam step, averaged over steps and tasks
    # (the reference's loop, its Adam state shared by the tasks, the weights restored after each).
    net = copy.deepcopy(algo.net)
    start = copy.deepcopy(net.state_dict())
    adam = torch.optim.Adam(net.parameters(), lr=algo.inner_lr, betas=(0.0, 0.999), eps=1e-8)
    x = torch.cat([episode.support_x, episode.query_x], dim=1)
    y = torch.cat([episode.support_y, episode.query_y], dim=1)
    seen, adapted = [], []
    for t in range(3):
        for b in batches[t]:
            adam.zero_grad()
            loss = F.cross_entropy(net(x[t][b]), y[t][b])
            seen.append(loss.item())
            loss.backward()
            adam.step()
        adapted.append([p.detach().clone() for p in net.parameters()])
        net.load_state_dict(start)
    torch.manual_seed(3)  # the algorithm draws the same batches
    out = algo(episode, train=True)
    assert out.loss.item() == pytest.approx(sum(seen) / len(seen), rel=1e-10)
    out.loss.backward()
    # theta - mean phi: a step of size 1 lands on the mean of the adapted weights, which differ from theta (but for
    # the conv biases before BatchNorm, whose gradients are rounding noise that Adam's eps all but silences)
    pre_bn = {f"net.{n}" for n in bias_before_batch_norm(algo.net)}
    for (name, p), t, *phis in zip(algo.named_parameters(), theta, *adapted):
        want = t - torch.stack(phis).mean(0)
        assert name in pre_bn or want.abs().max() > 1e-4, f"{name}: the tasks' adapted weights equal theta"
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for p, t in zip(algo.parameters(), theta):
        assert torch.equal(p, t)  # the forward moved nothing: the engine's optimizer makes the step


def test_mini_batches_use_every_image_before_any_repeats():
    torch.manual_seed(0)
    b = mini_batches(4, 7, 5, 3, torch.device("cpu"))  # 15 draws from 7 images: two full passes and one more
    assert b.shape == (4, 5, 3)
    for task in b.flatten(1):
        assert sorted(task[:7].tolist()) == list(range(7)) and sorted(task[7:14].tolist()) == list(range(7))
    assert not torch.equal(b[0], b[1])  # each task its own order


def test_test_leaves_weights_and_inner_adam_alone_and_is_deterministic():
    algo = small(eval_inner_steps=3, eval_inner_batch=4)
    algo(random_episode(), train=True)  # some Adam state to keep
    before = copy.deepcopy(algo.state_dict())
    episode = random_episode(seed=5)
    torch.manual_seed(9)
    a = algo(episode, train=False)
    torch.manual_seed(9)
    b = algo(episode, train=False)
    assert torch.equal(a.acc, b.acc) and a.acc.shape == (3,)
    for k, v in algo.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])  # the CPU's layout for Reptile (cpu_channels_last)
def test_test_adapts_the_tasks_side_by_side_as_each_alone(transductive, channels_last):
    # the vmapped test against each task adapted in turn by the training's own adapt() from a copy of the Adam state;
    # 2 shots: each task's 4 mini-batches of 5 are drawn from its 10 support images, different per task and step
    algo = small(eval_inner_steps=4, eval_inner_batch=5, transductive=transductive)
    algo(random_episode(shots=1, queries=9), train=True)  # some Adam state to start from
    if channels_last:
        algo.net.to(memory_format=torch.channels_last)
    episode = random_episode(tasks=3, shots=2, queries=3, seed=6)
    torch.manual_seed(2)
    out = algo(episode, train=False)
    torch.manual_seed(2)
    logits = task_loop(algo, episode)
    torch.manual_seed(2)
    batches = mini_batches(3, 10, 4, 5, torch.device("cpu"))
    assert not torch.equal(batches[0], batches[1])
    side_by_side = torch.func.vmap(algo._adapted_logits)(episode.support_x, episode.support_y, batches, episode.query_x)
    torch.testing.assert_close(side_by_side, logits, rtol=1e-4, atol=1e-5)
    assert logits.argmax(-1).unique().numel() > 1  # the tasks' predictions are not all one class
    torch.testing.assert_close(out.acc, (logits.argmax(-1) == episode.query_y).float().mean(-1))
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten()))


def test_test_numbers_do_not_depend_on_how_many_tasks_go_side_by_side():
    # eval.meta_batch_size is memory, not results: _test's draws and adaptation for 6 tasks at once or for 3 and then
    # 3 give the same logits, to the bit (CPU); 2 shots, so the mini-batches are random draws
    algo = small(eval_inner_steps=3, eval_inner_batch=5)
    algo(random_episode(shots=1, queries=9), train=True)
    e = random_episode(tasks=6, shots=2, queries=2, seed=8)
    adapted = torch.func.vmap(algo._adapted_logits)
    torch.manual_seed(3)
    whole = adapted(e.support_x, e.support_y, mini_batches(6, 10, 3, 5, torch.device("cpu")), e.query_x)
    torch.manual_seed(3)
    halves = [
        adapted(e.support_x[s], e.support_y[s], mini_batches(3, 10, 3, 5, torch.device("cpu")), e.query_x[s])
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert torch.equal(whole, torch.cat(halves))


def test_non_transductive_test_classifies_each_query_beside_the_support_set():
    algo = small(eval_inner_steps=2, eval_inner_batch=5, transductive=False)
    episode = random_episode(tasks=1)
    torch.manual_seed(4)
    out = algo(episode, train=False)
    torch.manual_seed(4)
    batches = mini_batches(1, 10, 2, 5, torch.device("cpu"))
    m, v, step = algo.adam_state()
    state = ([a.clone() for a in m], [a.clone() for a in v], step.clone())
    weights, _, _ = algo.adapt(episode.support_x[0], episode.support_y[0], batches[0], state)
    preds = []
    for q in episode.query_x[0]:
        batch = torch.cat([episode.support_x[0], q[None]])
        preds.append(torch.func.functional_call(algo.net, weights, (batch,))[-1].argmax())
    expected = (torch.stack(preds) == episode.query_y[0]).float().mean()
    torch.testing.assert_close(out.acc[0], expected)


def test_bad_settings_are_one_line_config_errors(compose_cfg):
    with pytest.raises(engine.ConfigError, match="^algo=reptile: inner_batch must be >= 1, got 0$") as info:
        engine.build(compose_cfg("train", [*TINY, "algo.inner_batch=0"]))
    assert "\n" not in str(info.value)


# ---- the presets' meta step, resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, iterations", [("reptile_omniglot_5w1s", 100000), ("reptile_omniglot_20w5s", 200000)])
def test_presets_meta_step_falls_linearly_from_one_to_zero(compose_cfg, preset, iterations):
    """The reference's meta step at iteration i is 1 - i / iterations; SGD without momentum makes it exactly."""
    # synthetic data has too few classes for 20 ways: 5 here, the schedule does not depend on them
    cfg = compose_cfg("train", [f"experiment={preset}", "dataset=synthetic", "episode.ways=5", "device=cpu"])
    run = engine.build(cfg)
    optimizer = make_optimizer(cfg.optim, run.algo.parameters())
    scheduler = make_scheduler(cfg.schedule, optimizer)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1 - 1 / iterations, 1 - 2 / iterations], abs=1e-12)
    assert cfg.trainer.iterations == iterations and cfg.trainer.meta_batch_size == 5


def test_resume_is_bit_identical_with_the_inner_adam_state(compose_cfg, tmp_path):
    straight, resumed, last, _ = straight_and_resumed(compose_cfg, tmp_path, TINY)
    assert last["iteration"] == 6 and last["model"]["adam_step"].item() > 0
    assert resumed["test"] == straight["test"]


# ---- real learning on Omniglot ------------------------------------------------------------------------------------

# 5-way 1-shot on CPU with a small net (Conv4 16 filters, flattened: 7.6k parameters), the preset's protocol but
# 300 meta-iterations (the meta step falls from 1 to 0 over them), inner_lr 5e-3 for the short budget, 20 test
# steps, 100 test tasks. Measured on the 2-core dev machine (one thread, beside a training run: about 80 s):
#   untrained 31.8 ± 4.1% (fine-tuned alone), trained 71.2 ± 4.3%.
# The meta-update's sign flipped (theta moves away from the adapted weights) diverges at iteration 33 (the engine
# stops the run); at the preset's inner_lr 1e-3 the same budget reaches only 39.8 ± 4.5%.
OMNIGLOT = [
    "experiment=reptile_omniglot_5w1s",
    "backbone.hidden=16",
    "device=cpu",
    "algo.inner_lr=0.005",
    "algo.eval_inner_steps=20",
    "trainer.iterations=300",
    "trainer.val_every=300",
    "trainer.val_episodes=20",
    "eval.episodes=100",
]


@pytest.mark.slow
@pytest.mark.omniglot
def test_learns_omniglot(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28):
    cfg = compose_cfg("train", [*OMNIGLOT, f"data_root={omniglot_root.parent}", f"cache_dir={omniglot_cache_dir}"])
    assert_learns(cfg, tmp_path, "reptile omniglot 5w1s", floor=0.6, gain=0.25)


def test_bench_reptile_closures_run():
    """scripts/bench_reptile.py's closures, once each on a CPU (make bench times them)."""
    bench = load_script("bench_reptile")
    for name, step in {**bench.steps(torch.device("cpu")), **bench.test_steps(torch.device("cpu"), 2)}.items():
        assert step() > 0, name
