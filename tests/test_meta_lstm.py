"""The Meta-Learner LSTM (Ravi & Larochelle 2017, fewshot.algorithms.meta_lstm): the preprocessing and the first
updates against hand computations, its meta-gradient without second-order terms, real learning on Omniglot, its
learned update against SGD, fewshot-eval and resume, and one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_learns, straight_and_resumed
from fewshot import engine
from fewshot.algorithms.functional import _StatelessCall
from fewshot.algorithms.meta_lstm import MetaLSTM, preprocess
from fewshot.checkpoint import load_checkpoint
from fewshot.data.base import Episode
from fewshot.data.sampler import fixed_episodes
from fewshot.engine.checkpoints import upgrade_config
from fewshot.eval import run as eval_run
from fewshot.models.backbones import Conv4
from test_algorithms import bias_before_batch_norm

TINY = [
    "algo=meta_lstm",
    "algo.updates=2",
    "backbone=conv4_pool",
    "backbone.hidden=8",
    "dataset=synthetic",
    "device=cpu",
    "trainer.meta_batch_size=2",
    "trainer.iterations=6",
    "trainer.val_every=3",
    "trainer.val_episodes=4",
    "trainer.checkpoint_every=3",
    "trainer.grad_clip=0.25",
    "eval.episodes=6",
    "eval.meta_batch_size=3",
    "episode.queries=2",
]


def small_algo(updates: int = 3, strategy: str = "loop", seed: int = 0) -> MetaLSTM:
    torch.manual_seed(seed)
    backbone = functools.partial(Conv4, in_channels=1, image_size=28, hidden=8, max_pool=True)
    return MetaLSTM(backbone, 5, updates=updates, strategy=strategy)


def random_episode(
    tasks: int = 2, shots: int = 1, queries: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32
) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(tasks, 5 * shots, 1, 28, 28, generator=g).to(dtype),
        torch.arange(5).repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, 5 * queries, 1, 28, 28, generator=g).to(dtype),
        torch.arange(5).repeat_interleave(queries).repeat(tasks, 1),
        ways=5,
    )


def zero_gate_weights(algo: MetaLSTM) -> None:
    """With W_F = W_I = 0 the gates are their biases: every update is SGD at rate sigmoid(b_I), decay sigmoid(b_F)."""
    with torch.no_grad():
        algo.forget_gate.weight.zero_()
        algo.input_gate.weight.zero_()


def sgd(algo: MetaLSTM, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, decay: float = 1.0):
    """steps of w <- decay * w - lr * grad on the learner net's own parameters (torch.func.functional_call, not
    fewshot's flat-vector machinery); returns the flat weights after each step, the start included."""
    w = {k: p.detach().clone() for k, p in algo.net.named_parameters()}
    out = [torch.cat([v.reshape(-1) for v in w.values()])]
    for _ in range(steps):
        w = {k: v.requires_grad_() for k, v in w.items()}
        loss = F.cross_entropy(torch.func.functional_call(algo.net, w, (x,)), y)
        grads = torch.autograd.grad(loss, list(w.values()))
        w = {k: (decay * v - lr * g).detach() for (k, v), g in zip(w.items(), grads)}
        out.append(torch.cat([v.reshape(-1) for v in w.values()]))
    return out


# ---- reference checks -------------------------------------------------------------------------------------------


def test_preprocessing_against_hand_values():
    e = math.e
    x = torch.tensor([1.0, -(e**2), e**-10, 1e-6, -3e-5, 0.0])
    expected = torch.tensor(
        [
            [0.0, 1.0],  # log(1)/10, sign
            [0.2, -1.0],  # log(e^2)/10
            [-1.0, 1.0],  # |x| = e^-p exactly: still the log branch, log(e^-10)/10 = -1
            [-1.0, 1e-6 * e**10],  # below e^-10 = 4.54e-5: (-1, e^p x) = (-1, 0.0220265)
            [-1.0, -3e-5 * e**10],  # (-1, -0.660794)
            [-1.0, 0.0],
        ]
    )
    torch.testing.assert_close(preprocess(x, 10.0), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        preprocess(torch.tensor([0.5, -0.2]), 1.0), torch.tensor([[-0.693147, 1.0], [-1, -0.2 * e]])
    )


def test_initial_biases_make_it_sgd_with_a_small_rate():
    algo = small_algo()
    assert -5 <= algo.input_gate.bias.item() <= -4
    # The authors' code draws bF from U(4, 5): twenty draws tell it from U(4, 6) but for a 1e-6 chance
    forget = [small_algo(seed=seed).forget_gate.bias.item() for seed in range(20)]
    assert all(4 <= b <= 5 for b in forget) and max(forget) - min(forget) > 0.3
    assert algo.forget_gate.weight.abs().max() <= 0.01 and algo.input_gate.weight.abs().max() <= 0.01
    # c_0 is the learner's own initial weights, a meta-parameter.
    assert algo.num_learner_parameters == sum(p.numel() for p in algo.net.parameters())
    assert all(any(p is q for q in algo.parameters()) for p in algo.net.parameters())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_updates_equal_sgd_at_the_implied_rate(strategy):
    """Gate input weights zeroed: 3 updates are exactly 3 SGD steps at lr sigmoid(b_I) with decay sigmoid(b_F)."""
    algo = small_algo(strategy=strategy)
    zero_gate_weights(algo)
    ep = random_episode()
    lr, decay = torch.sigmoid(algo.input_gate.bias).item(), torch.sigmoid(algo.forget_gate.bias).item()
    with torch.no_grad():
        c, _ = algo.adapt(ep.support_x, ep.support_y, 3)
    for t in range(ep.tasks):
        expected = sgd(algo, ep.support_x[t], ep.support_y[t], lr, 3, decay)[-1]
        torch.testing.assert_close(c[t], expected, rtol=0, atol=1e-6)
        assert (c[t] - algo.flat_parameters()).abs().max() > 1e-3  # the updates did move the weights


def test_meta_gradient_has_no_second_order_terms():
    """Two updates with zeroed gate weights: c_2 = a^2 c_0 - a s g_0 - s g_1 with a = sigmoid(b_F), s = sigmoid(b_I)
    and the support gradients g_0, g_1 constants, so dL/dc_0 = a^2 dL/dc_2 and dL/db_I = s(1-s) dL/dc_2 . (-a g_0 - g_1)
    exactly; a second-order term (the Hessian through g) would break both."""
    algo = small_algo(updates=2)
    zero_gate_weights(algo)
    ep = random_episode(tasks=1)
    algo.zero_grad()
    algo(ep, train=True).loss.backward()
    a, s = torch.sigmoid(algo.forget_gate.bias).item(), torch.sigmoid(algo.input_gate.bias).item()
    c0, c1, c2 = sgd(algo, ep.support_x[0], ep.support_y[0], s, 2, a)
    g0, g1 = (a * c0 - c1) / s, (a * c1 - c2) / s
    c2 = c2.clone().requires_grad_()
    query_loss = F.cross_entropy(algo.query_logits(c2.unsqueeze(0), ep.query_x)[0], ep.query_y[0])
    (dc2,) = torch.autograd.grad(query_loss, c2)
    grad_c0 = torch.cat([p.grad.reshape(-1) for p in algo.net.parameters()])
    torch.testing.assert_close(grad_c0, a * a * dc2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        algo.input_gate.bias.grad, (s * (1 - s) * dc2 @ (-a * g0 - g1)).reshape(1), rtol=1e-3, atol=1e-9
    )


def test_support_statistics_are_pytorchs_running_statistics_after_one_support_pass():
    # stats_rows=S normalises every row with the first S rows' statistics: what PyTorch's own BatchNorm gives in
    # eval() after one train() pass over those rows with momentum 1 (unbiased running variance), layer by layer
    torch.manual_seed(0)
    net = Conv4(in_channels=1, image_size=28, out_features=5, hidden=8, max_pool=True)
    reference = Conv4(in_channels=1, image_size=28, out_features=5, hidden=8, max_pool=True, running_stats=True)
    reference.load_state_dict(net.state_dict(), strict=False)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
            m.weight.data.uniform_(0.5, 1.5)  # scale and shift away from 1 and 0, in both nets
            m.bias.data.uniform_(-0.5, 0.5)
    net.load_state_dict(reference.state_dict(), strict=False)
    support, query = torch.rand(5, 1, 28, 28), torch.rand(7, 1, 28, 28)
    reference.train()(support)
    want = reference.eval()(query)
    call = _StatelessCall(net, stats_rows=5)
    got = call(dict(net.named_parameters()), torch.cat([support, query]))[5:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(net(torch.cat([support, query]))[5:], want, atol=1e-3)  # the batch's own: another


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_test_queries_are_normalised_with_the_support_not_with_each_other(strategy):
    # test_bn="support" (the authors' code): a query's logits do not depend on the other queries of its task;
    # test_bn="batch" normalises the queries as one batch, so they do
    ep = random_episode(tasks=2, queries=3)
    swapped = dataclasses.replace(ep, query_x=torch.cat([ep.query_x[:, :1], torch.rand_like(ep.query_x[:, 1:])], 1))
    for test_bn, independent in (("support", True), ("batch", False)):
        algo = small_algo(strategy=strategy)
        algo.test_bn = test_bn
        first = [algo.adapt(e.support_x, e.support_y, 2, e.query_x)[1] for e in (ep, swapped)]
        same = all(torch.allclose(a[:, 0], b[:, 0], atol=1e-6) for a, b in zip(*first))
        assert same == independent, test_bn
    # Each query's logits, after the updates, are the learner's on its task's support and that query alone
    algo.test_bn = "support"
    c, logits = algo.adapt(ep.support_x, ep.support_y, 2, ep.query_x)
    call, rows = _StatelessCall(algo.net, stats_rows=ep.support_x.shape[1]), ep.support_x.shape[1]
    for t, q in itertools.product(range(2), range(ep.query_x.shape[1])):
        alone = call(algo.unflatten(c[t]), torch.cat([ep.support_x[t], ep.query_x[t, q : q + 1]]))[rows]
        torch.testing.assert_close(logits[-1][t, q], alone, rtol=1e-5, atol=1e-6)


def test_old_checkpoints_keep_the_batch_statistics_test():
    # Before algo.test_bn, the Meta-Learner LSTM normalised its test queries as one batch: an old checkpoint says so
    config = {"algo": {"_target_": "fewshot.algorithms.meta_lstm.MetaLSTM", "name": "meta_lstm", "updates": 12}}
    assert upgrade_config(config)["algo"]["test_bn"] == "batch"
    assert upgrade_config({"algo": {**config["algo"], "test_bn": "support"}})["algo"]["test_bn"] == "support"


def test_loop_and_vmap_agree():
    # float64, each parameter's gradient against its own size: the LSTM's and the gates' gradients pass through
    # W_F and W_I (at most 0.01 at init) and sit orders below the learner's, so one flat tolerance over all of
    # them would pass a vmap that got exactly those wrong.
    ep = random_episode(tasks=3, dtype=torch.float64)
    losses, grads = {}, {}
    for strategy in ("loop", "vmap"):
        algo = small_algo(strategy=strategy).double()
        out = algo(ep, train=True)
        out.loss.backward()
        losses[strategy] = out.loss.detach()
        grads[strategy] = {k: p.grad for k, p in algo.named_parameters()}
        test = algo(ep, train=False)
        assert test.step_acc.shape == (3, algo.updates + 1)
        assert torch.equal(test.acc, test.step_acc[:, -1])
    torch.testing.assert_close(losses["loop"], losses["vmap"], rtol=1e-12, atol=0)
    # The conv biases before BatchNorm are subtracted out again: their gradient is zero up to rounding.
    pre_bn = {f"net.{n}" for n in bias_before_batch_norm(algo.net)}
    assert pre_bn and grads["loop"].keys() == grads["vmap"].keys()
    for k, g in grads["loop"].items():
        scale = g.abs().max().item()
        if k in pre_bn:
            assert scale < 1e-12 and grads["vmap"][k].abs().max().item() < 1e-12, k
            continue
        assert scale > 0, f"{k}: no gradient"
        torch.testing.assert_close(grads["vmap"][k], g, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{k}: {m}")


# ---- one-line errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.updates=0", "updates >= 1"),
        ("algo.eval_updates=0", "eval_updates >= 1"),
        ("algo.hidden_size=0", "hidden_size must be >= 1"),
        ("algo.preprocess_p=-1", "preprocess_p must be a positive number"),
        ("algo.strategy=threads", "strategy must be one of auto, vmap, loop"),
    ],
)
def test_bad_settings_are_one_line_config_errors(compose_cfg, override, message):
    with pytest.raises(engine.ConfigError, match=f"^algo=meta_lstm: MetaLSTM .*{message}") as info:
        engine.build(compose_cfg("train", [*TINY, override]))
    assert "\n" not in str(info.value)


def test_bad_setting_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fewshot-train"), *TINY, "algo.updates=-3", "hydra.run.dir=run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "algo=meta_lstm" in lines[0] and "updates >= 1" in lines[0] and "Traceback" not in proc.stderr


# ---- fewshot-eval and resume ----------------------------------------------------------------------------------------


def test_eval_reproduces_and_resume_is_bit_identical(compose_cfg, tmp_path):
    straight, resumed, last, _ = straight_and_resumed(compose_cfg, tmp_path, TINY)
    assert last["iteration"] == 6 and resumed["test"] == straight["test"]
    assert len(straight["test"]["step_acc"]) == 2 + 1  # before the first update and after each
    again = eval_run(
        compose_cfg("eval", [f"checkpoint={tmp_path / 'straight/checkpoints/best.pt'}", "device=cpu"]), tmp_path / "ev"
    )
    assert again["test"] == straight["test"] and again["algo"] == "meta_lstm"


# ---- real learning on Omniglot ------------------------------------------------------------------------------------

# 5-way 1-shot on CPU with a small learner (Conv4-pool 16 filters, 9.5k coordinates) and 5 updates, 150 meta-
# iterations of 4 tasks at meta_lr 5e-3, 100 test tasks. Measured on the 2-core dev machine (about 45 s):
#   untrained 20.5% (its update is SGD at lr ~0.008: 5 steps do not move the query accuracy), trained 79.1 ± 2.4%;
#   support loss over the 5 updates on 20 test tasks: untrained 3.379 -> 0.825, SGD at the implied rate 0.0079
#   -> 0.821; trained 2.803 -> 0.049. On 2026-11-28 (torch 2.14.1): trained 3.149 -> 0.024 against 1.244 for SGD
#   at the trained sigmoid(b_I) = 0.0101 from the same start with 1 thread; 2.421 -> 0.039 against 0.732 (0.0109)
#   with 2 threads, whose float reductions give another trained model.
# Broken variants at the same budget stay below the 65% bar: gates frozen at their SGD initialisation (only c_0
# meta-learned) 39.4 ± 2.8%; the update's sign flipped (c_t = sigmoid(f) c + sigmoid(i) grad) 52.3 ± 2.9%.
OMNIGLOT = [
    "algo=meta_lstm",
    "algo.updates=5",
    "backbone=conv4_pool",
    "backbone.hidden=16",
    "device=cpu",
    "trainer.meta_batch_size=4",
    "trainer.iterations=150",
    "trainer.val_every=150",
    "trainer.val_episodes=20",
    "trainer.meta_lr=0.005",
    "trainer.grad_clip=0.25",
    "eval.episodes=100",
    "episode.queries=5",
]


def support_loss_drop(algo: MetaLSTM, episode: Episode, updates: int) -> tuple[float, float]:
    """Mean support loss at c_0 and after `updates` meta-learner updates."""
    with torch.no_grad():
        c, _ = algo.adapt(episode.support_x, episode.support_y, updates)
        c0 = algo.flat_parameters().expand_as(c)
        losses = [
            F.cross_entropy(algo.query_logits(w, episode.support_x).flatten(0, 1), episode.support_y.flatten()).item()
            for w in (c0, c)
        ]
    return losses[0], losses[1]


def sgd_support_loss(algo: MetaLSTM, episode: Episode, lr: float, steps: int) -> float:
    total = 0.0
    for t in range(episode.tasks):
        w = sgd(algo, episode.support_x[t], episode.support_y[t], lr, steps)[-1]
        logits = algo.query_logits(w.unsqueeze(0), episode.support_x[t : t + 1])[0]
        total += F.cross_entropy(logits, episode.support_y[t]).item()
    return total / episode.tasks


@pytest.mark.slow
@pytest.mark.omniglot
def test_learns_omniglot_and_its_update_beats_sgd(
    compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28
):
    cfg = compose_cfg("train", [*OMNIGLOT, f"data_root={omniglot_root.parent}", f"cache_dir={omniglot_cache_dir}"])
    untrained, _, _ = assert_learns(cfg, tmp_path, "meta_lstm omniglot 5w1s", floor=0.65, gain=0.25)
    sampler = engine.make_sampler(untrained, "test")

    # The learned update on 20 fixed test tasks: at initialisation it lowers the support loss as SGD at the
    # implied rate sigmoid(b_I) does; after meta-training it fits the support far further than SGD at the trained
    # sigmoid(b_I) does from the same trained start (the start alone is not the update: meta-training lowers it too,
    # by how much varies with the run, e.g. with the thread count's float reductions). This shows the gates learned
    # more than their bias's step; it does not show the update beats SGD at a rate tuned for these tasks.
    trained = engine.build(cfg)
    trained.algo.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"])
    (episode,) = fixed_episodes(sampler, 20, 20, 1234)
    init_start, init_end = support_loss_drop(untrained.algo, episode, 5)
    rate = torch.sigmoid(untrained.algo.input_gate.bias).item()
    sgd_end = sgd_support_loss(untrained.algo, episode, rate, 5)
    trained_start, trained_end = support_loss_drop(trained.algo, episode, 5)
    trained_rate = torch.sigmoid(trained.algo.input_gate.bias).item()
    trained_sgd_end = sgd_support_loss(trained.algo, episode, trained_rate, 5)
    drop_init, drop_sgd = init_start - init_end, init_start - sgd_end
    print(
        f"support loss over 5 updates: untrained {init_start:.4f} -> {init_end:.4f} (drop {drop_init:.4f}), "
        f"SGD at lr sigmoid(b_I)={rate:.4f} -> {sgd_end:.4f} (drop {drop_sgd:.4f}); "
        f"trained {trained_start:.4f} -> {trained_end:.4f}, SGD from there at sigmoid(b_I)={trained_rate:.4f} -> "
        f"{trained_sgd_end:.4f}"
    )
    assert drop_init > 0 and drop_sgd > 0
    assert 0.8 < drop_init / drop_sgd < 1.25, (drop_init, drop_sgd)
    # Even tiny steps fit 5 support images a good way (BatchNorm over 5 images); the learned update fits them
    # much further than SGD from the same start, and further than the untrained update does.
    assert trained_end < 0.2 * trained_sgd_end and trained_end < 0.2 * init_end, (
        trained_end,
        trained_sgd_end,
        init_end,
    )


# ---- the learned update with non-zero gate weights, written out by hand --------------------------------------------

# A learner small enough to differentiate by hand: logits = x W^T + b, 3 features, 2 ways, 8 coordinates, c_0 =
# (W row-major, b) as flat_parameters() lays it out. Feature 3 is exactly 0 in task 0's support (its column of W
# gets a zero gradient) and below 4e-5 in task 1's (|gradient| < e^-10), so both branches of the preprocessing run.
HAND_W0 = [[0.3, -0.2, 0.5], [-0.4, 0.6, -0.1]]
HAND_B0 = [0.05, -0.15]
HAND_SUPPORT_X = [
    [[1.0, 0.5, 0.0], [-0.5, 1.5, 0.0], [0.8, -1.2, 0.0]],
    [[0.2, -0.9, 3e-5], [1.1, 0.4, -2e-5], [-0.7, 0.3, 4e-5]],
]
HAND_SUPPORT_Y = [[0, 1, 1], [1, 0, 1]]
HAND_QUERY_X = [[[0.6, 0.1, 0.2], [-0.3, 0.9, -0.4]], [[1.2, -0.5, 0.7], [0.0, 0.8, 0.3]]]
HAND_QUERY_Y = [[0, 1], [1, 0]]
HAND_HIDDEN = 3
# Layer 2, laid out as the gates read their input: [h_t (3 units), c_{t-1}, own gate pre-activation_{t-1}].
HAND_W_F, HAND_B_F = [0.8, -0.5, 0.3, 0.4, 0.6], 1.5
HAND_W_I, HAND_B_I = [-0.7, 0.9, 0.2, -0.3, -0.8], -1.0


def hand_pattern(n: int, scale: float, phase: float) -> torch.Tensor:
    """n distinct, non-zero, deterministic values in [-scale, scale] (float64)."""
    return scale * torch.sin(1.3 * torch.arange(n, dtype=torch.float64) + phase)


def hand_lstm_weights() -> dict[str, torch.Tensor]:
    h = HAND_HIDDEN
    return {
        "weight_ih": hand_pattern(4 * h * 4, 0.9, 0.1).view(4 * h, 4),
        "weight_hh": hand_pattern(4 * h * h, 0.7, 0.5).view(4 * h, h),
        "bias_ih": hand_pattern(4 * h, 0.3, 0.9),
        "bias_hh": hand_pattern(4 * h, 0.2, 1.7),
    }


def hand_preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.: (log|x| / p, sign x) if |x| >= e^-p else (-1, e^p x); (...,) -> (..., 2)."""
    out = torch.empty(*x.shape, 2, dtype=x.dtype)
    for k, v in enumerate(x.reshape(-1).tolist()):
        if abs(v) >= math.exp(-p):
            out.view(-1, 2)[k] = torch.tensor([math.log(abs(v)) / p, math.copysign(1.0, v)], dtype=x.dtype)
        else:
            out.view(-1, 2)[k] = torch.tensor([-1.0, math.exp(p) * v], dtype=x.dtype)
    return out


def hand_loss_and_grad(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the linear learner c = (W, b) on (x, y) and its gradient, written out (no autograd)."""
    w, b = c[:6].view(2, 3), c[6:]
    z = x @ w.T + b
    log_p = z - torch.log(torch.exp(z).sum(1, keepdim=True))
    onehot = torch.eye(2, dtype=x.dtype)[y]
    loss = -(log_p * onehot).sum() / len(y)
    dz = (torch.exp(log_p) - onehot) / len(y)
    return loss, torch.cat([(dz.T @ x).reshape(-1), dz.sum(0)])


def hand_meta_lstm(c0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, updates: int) -> list[torch.Tensor]:
    """c_0, c_1, ... c_updates of one task, from the module docstring's equations with the hand weights:
    layer 1 an LSTM cell (PyTorch's gate rows i, f, g, o) over [preprocessed loss, preprocessed gradient] of each
    coordinate; f_t = W_F [h_t, c_{t-1}, f_{t-1}] + b_F, i_t = W_I [h_t, c_{t-1}, i_{t-1}] + b_I (pre-activations,
    0 before the first update); c_t = sigmoid(f_t) c_{t-1} - sigmoid(i_t) grad_t."""
    lstm = hand_lstm_weights()
    params, hid = c0.numel(), HAND_HIDDEN
    h, cell = torch.zeros(params, hid, dtype=c0.dtype), torch.zeros(params, hid, dtype=c0.dtype)
    f_prev, i_prev = torch.zeros(params, dtype=c0.dtype), torch.zeros(params, dtype=c0.dtype)
    wf, wi = torch.tensor(HAND_W_F, dtype=c0.dtype), torch.tensor(HAND_W_I, dtype=c0.dtype)
    cs = [c0]
    for _ in range(updates):
        c = cs[-1]
        loss, grad = hand_loss_and_grad(c, x, y)
        inputs = torch.cat([hand_preprocess(loss).expand(params, 2), hand_preprocess(grad)], 1)  # (P, 4)
        z = inputs @ lstm["weight_ih"].T + lstm["bias_ih"] + h @ lstm["weight_hh"].T + lstm["bias_hh"]
        zi, zf, zg, zo = z[:, :hid], z[:, hid : 2 * hid], z[:, 2 * hid : 3 * hid], z[:, 3 * hid :]
        cell = torch.sigmoid(zf) * cell + torch.sigmoid(zi) * torch.tanh(zg)
        h = torch.sigmoid(zo) * torch.tanh(cell)
        f = h @ wf[:hid] + wf[hid] * c + wf[hid + 1] * f_prev + HAND_B_F
        i = h @ wi[:hid] + wi[hid] * c + wi[hid + 1] * i_prev + HAND_B_I
        cs.append(torch.sigmoid(f) * c - torch.sigmoid(i) * grad)
        f_prev, i_prev = f, i
    return cs


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_two_updates_with_nonzero_gates_match_hand_computation(strategy):
    """Non-zero, distinct gate and LSTM weights, so the first layer (and its state carried from update 1 to 2),
    the gates' inputs h_t, c_{t-1} and previous gates, the preprocessed loss and gradient and the sign of the update
    all matter: c_1 and c_2 of two tasks, and the training loss at c_2, equal the equations written out in float64."""
    learner = functools.partial(torch.nn.Linear, 3)  # learner(out_features=ways): no buffers, 8 coordinates
    algo = MetaLSTM(learner, 2, updates=2, hidden_size=HAND_HIDDEN, strategy=strategy).double()
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    with torch.no_grad():
        algo.net.weight.copy_(f64(HAND_W0))
        algo.net.bias.copy_(f64(HAND_B0))
        for name, value in hand_lstm_weights().items():
            getattr(algo.lstm, name).copy_(value)
        algo.forget_gate.weight.copy_(f64([HAND_W_F]))
        algo.forget_gate.bias.fill_(HAND_B_F)
        algo.input_gate.weight.copy_(f64([HAND_W_I]))
        algo.input_gate.bias.fill_(HAND_B_I)
    ep = Episode(f64(HAND_SUPPORT_X), torch.tensor(HAND_SUPPORT_Y), f64(HAND_QUERY_X), torch.tensor(HAND_QUERY_Y), 2)
    c0 = torch.cat([f64(HAND_W0).reshape(-1), f64(HAND_B0)])
    torch.testing.assert_close(algo.flat_parameters().detach(), c0, rtol=0, atol=0)

    expected = [hand_meta_lstm(c0, ep.support_x[t], ep.support_y[t], 2) for t in range(2)]
    # The hand computation exercises what it should: both preprocessing branches, and second updates that move
    # every coordinate (the zero-gradient ones through the forget gate) by far more than the tolerance.
    grads = torch.stack([hand_loss_and_grad(expected[t][1], ep.support_x[t], ep.support_y[t])[1] for t in range(2)])
    assert (grads.abs() < math.exp(-10)).any() and (grads.abs() > 1e-2).any()
    assert (torch.stack([e[2] - e[1] for e in expected]).abs() > 1e-3).all()

    c1, _ = algo.adapt(ep.support_x, ep.support_y, 1)
    c2, _ = algo.adapt(ep.support_x, ep.support_y, 2)
    torch.testing.assert_close(c1.detach(), torch.stack([e[1] for e in expected]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c2.detach(), torch.stack([e[2] for e in expected]), rtol=1e-12, atol=1e-12)

    # forward(train=True): the mean query loss of the learner at c_2 (hand loss per task, both tasks 2 queries).
    query_loss = sum(hand_loss_and_grad(expected[t][2], ep.query_x[t], ep.query_y[t])[0] for t in range(2)) / 2
    torch.testing.assert_close(algo(ep, train=True).loss.detach(), query_loss, rtol=1e-12, atol=1e-12)
