"""Meta-SGD on CPU: meta-gradients equal learn2learn's MetaSGD for the weights and the step sizes, in every MAML
strategy; with equal step sizes it is MAML; the step sizes are what the inner loop uses, at test too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot.algorithms.maml import MAML
from fewshot.algorithms.meta_sgd import MetaSGD
from fewshot.data.base import Episode
from test_algorithms import WAYS, assert_grads_close, conv4, intra_op_threads, meta_grads, random_episode


def learn2learn_meta_grads(algo: MetaSGD, episode: Episode, steps: int, first_order: bool) -> tuple:
    """The mean query loss and its gradients by learn2learn's MetaSGD (clone, adapt, task by task), on a copy
    of algo's weights and step sizes, keyed as algo.named_parameters() (net.*, lrs.*)."""
    import learn2learn as l2l

    theirs = MetaSGD(conv4(), WAYS).to(algo.lrs[0].dtype)
    theirs.load_state_dict(algo.state_dict())
    meta = l2l.algorithms.MetaSGD(theirs.net, lr=0.0, first_order=first_order)
    for mine, copied in zip(meta.lrs, theirs.lrs):
        mine.data.copy_(copied.data)
    losses = []
    for support_x, support_y, query_x, query_y in zip(
        episode.support_x, episode.support_y, episode.query_x, episode.query_y
    ):
        learner = meta.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y))
        losses.append(F.cross_entropy(learner(query_x), query_y))
    loss = torch.stack(losses).mean()
    grads = torch.autograd.grad(loss, [*meta.module.parameters(), *meta.lrs])
    names = [k for k, _ in theirs.net.named_parameters()]
    keyed = {f"net.{k}": g for k, g in zip(names, grads)}
    keyed |= {f"lrs.{i}": g for i, g in enumerate(grads[len(names) :])}
    return loss.detach(), keyed


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 2], ids=["1-step", "2-steps"])
@pytest.mark.parametrize(
    "strategy,threads,chunk",
    [("loop", 1, None), ("loop", 2, None), ("vmap", 1, None), ("vmap", 1, 2)],
    ids=["loop", "loop-threaded", "vmap", "vmap-chunked"],
)
def test_meta_gradient_matches_learn2learn(first_order, steps, strategy, threads, chunk):
    """Every path of MAML's engine (whole graph, threaded loop, chunks through _MetaGradient) hands the step
    sizes their gradient; a path that dropped it would leave lrs.* at zero here."""
    torch.manual_seed(0)
    ours = MetaSGD(conv4(), WAYS, inner_steps=steps, first_order=first_order, strategy=strategy, chunk_size=chunk)
    ours = ours.double()
    episode = random_episode(tasks=3, dtype=torch.float64, seed=1)
    with intra_op_threads(threads):
        loss_ours, g_ours = meta_grads(ours, episode)
    loss_theirs, g_theirs = learn2learn_meta_grads(ours, episode, steps, first_order)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-9, atol=1e-11)
    assert_grads_close(g_ours, g_theirs, rtol=1e-9, atol=1e-11)
    assert all(g_ours[f"lrs.{i}"].abs().sum() > 0 for i in (0, len(ours.lrs) - 1))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_equal_step_sizes_are_maml(strategy):
    """With every step size at MAML's inner_lr, the loss, the weights' meta-gradient and the test scores are
    MAML's: Meta-SGD is MAML's engine plus the step sizes, nothing else."""
    torch.manual_seed(0)
    meta_sgd = MetaSGD(conv4(), WAYS, init_lr_min=0.4, init_lr_max=0.4, inner_steps=2, eval_inner_steps=3)
    maml = MAML(conv4(), WAYS, inner_lr=0.4, inner_steps=2, eval_inner_steps=3, strategy=strategy)
    meta_sgd.strategy = strategy
    maml.load_state_dict({k: v for k, v in meta_sgd.state_dict().items() if k.startswith("net.")})
    maml, meta_sgd = maml.double(), meta_sgd.double()
    with torch.no_grad():  # 0.4 itself, not float32's 0.4 cast up
        for lr in meta_sgd.lrs:
            lr.fill_(0.4)
    episode = random_episode(tasks=3, dtype=torch.float64, seed=2)
    loss_a, g_a = meta_grads(meta_sgd, episode)
    loss_b, g_b = meta_grads(maml, episode)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    assert_grads_close({k: v for k, v in g_a.items() if k.startswith("net.")}, g_b, rtol=1e-10, atol=1e-12)
    a, b = meta_sgd(episode, train=False), maml(episode, train=False)
    assert torch.equal(a.step_score, b.step_score) and a.step_score.shape == (3, 4)


def test_the_step_sizes_are_what_adapts_at_test():
    """Zero step sizes leave every query prediction as it was before adapting; trained ones change them, and one
    optimiser step moves the step sizes themselves."""
    torch.manual_seed(0)
    algo = MetaSGD(conv4(), WAYS, eval_inner_steps=1).double()
    episode = random_episode(tasks=4, dtype=torch.float64, seed=3)
    adapting = algo(episode, train=False)  # the step sizes as drawn, U[0.005, 0.1]: some answers change
    assert not torch.equal(adapting.step_score[:, 0], adapting.step_score[:, 1])
    with torch.no_grad():
        for lr in algo.lrs:
            lr.zero_()
    frozen = algo(episode, train=False)
    assert torch.equal(frozen.step_score[:, 0], frozen.step_score[:, 1])
    for lr in algo.lrs:
        assert lr.min() == 0 and lr.max() == 0
    before = [lr.detach().clone() for lr in algo.lrs]
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-2)
    algo(episode, train=True).loss.backward()
    optimizer.step()
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, algo.lrs))
    assert moved >= len(before) - 1  # every step size but those of biases before BatchNorm (zero gradient)


def test_step_sizes_start_in_their_range_and_are_checkpointed():
    torch.manual_seed(0)
    algo = MetaSGD(conv4(), WAYS)
    values = torch.cat([lr.flatten() for lr in algo.lrs])
    assert 0.005 <= values.min() and values.max() <= 0.1 and values.std() > 0.02
    assert [lr.shape for lr in algo.lrs] == [p.shape for p in algo.net.parameters()]
    assert {f"lrs.{i}" for i in range(len(algo.lrs))} <= set(algo.state_dict())


@pytest.mark.parametrize("low,high", [(0.1, 0.01), (-0.1, 0.1), (0.0, float("inf"))])
def test_bad_step_size_range_is_refused(low, high):
    with pytest.raises(ValueError, match="0 <= init_lr_min <= init_lr_max"):
        MetaSGD(conv4(), WAYS, init_lr_min=low, init_lr_max=high)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_vmap_meta_gradient_matches_learn2learn_on_cuda(first_order):
    """The GPU path (vmap's grouped convolutions, cuDNN), in float64, against learn2learn on the CPU."""
    torch.manual_seed(0)
    ours = MetaSGD(conv4(), WAYS, inner_steps=2, first_order=first_order, strategy="vmap").double()
    episode = random_episode(tasks=3, dtype=torch.float64, seed=1)
    loss_theirs, g_theirs = learn2learn_meta_grads(ours, episode, 2, first_order)
    ours = ours.cuda()
    on_gpu = Episode(*(t.cuda() for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y)))
    loss_ours, g_ours = meta_grads(ours, on_gpu)
    torch.testing.assert_close(loss_ours.cpu(), loss_theirs, rtol=1e-9, atol=1e-11)
    assert_grads_close({k: g.cpu() for k, g in g_ours.items()}, g_theirs, rtol=1e-7, atol=1e-9)
