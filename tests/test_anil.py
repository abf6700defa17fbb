"""ANIL on CPU: meta-gradients equal learn2learn's MAML on the head (its ANIL example's update), both body strategies,
first and second order; an inner step is the head's cross-entropy gradient by hand; the test adapts the head alone."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import load_script
from fewshot.algorithms.anil import ANIL, head_logits
from fewshot.data.base import Episode
from test_algorithms import WAYS, assert_grads_close, conv4, meta_grads, random_episode


def learn2learn_meta_grads(algo: ANIL, episode: Episode) -> tuple:
    """The mean query loss and its gradients by learn2learn's MAML around the head (bench_descendants.ANILL2L: its
    ANIL example's update, task by task), on a copy of algo's weights, keyed as algo.named_parameters()."""
    theirs = copy.deepcopy(algo)
    loss = load_script("bench_descendants").ANILL2L(theirs)(episode).loss
    names = [k for k, _ in theirs.named_parameters()]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, list(theirs.parameters()))))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3], ids=["1-step", "3-steps"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_meta_gradient_matches_learn2learn(first_order, steps, strategy):
    torch.manual_seed(0)
    ours = ANIL(conv4(), WAYS, inner_lr=0.5, inner_steps=steps, first_order=first_order, strategy=strategy).double()
    episode = random_episode(tasks=3, dtype=torch.float64, seed=1)
    loss_ours, g_ours = meta_grads(ours, episode)
    loss_theirs, g_theirs = learn2learn_meta_grads(ours, episode)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-9, atol=1e-11)
    assert_grads_close(g_ours, g_theirs, rtol=1e-9, atol=1e-11)
    # The body learns in both orders (through the query features; second order also through the support's)
    assert g_ours["body.features.0.weight"].abs().sum() > 0 and g_ours["head.weight"].abs().sum() > 0


def test_second_order_also_reaches_the_body_through_the_support():
    # Second order reaches the body through the support features too: its body gradient must differ from first
    # order's, while with the inner step size at 0 (no adaptation) both are the plain query-loss gradient.
    torch.manual_seed(0)
    episode = random_episode(tasks=2, dtype=torch.float64, seed=3)
    grads = {}
    for lr in (0.0, 0.5):
        for first_order in (False, True):
            algo = ANIL(conv4(), WAYS, inner_lr=lr, first_order=first_order).double()
            torch.manual_seed(0)
            algo.load_state_dict(ANIL(conv4(), WAYS).double().state_dict())
            grads[lr, first_order] = meta_grads(algo, episode)[1]["body.features.0.weight"]
    torch.testing.assert_close(grads[0.0, False], grads[0.0, True], rtol=1e-12, atol=1e-14)
    assert (grads[0.5, False] - grads[0.5, True]).abs().max() > 1e-3 * grads[0.5, True].abs().max()


def test_an_inner_step_is_the_heads_cross_entropy_gradient():
    # d(mean CE)/dW = (softmax - onehot)^T f / S and d/db = sum(softmax - onehot) / S, per task.
    torch.manual_seed(0)
    algo = ANIL(conv4(), WAYS, inner_lr=0.3).double()
    tasks, shots, dim = 2, 4, algo.head.in_features
    features = torch.randn(tasks, WAYS * shots, dim, dtype=torch.float64)
    labels = torch.arange(WAYS).repeat_interleave(shots).expand(tasks, -1)
    weight = torch.randn(tasks, WAYS, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(tasks, WAYS, dtype=torch.float64, requires_grad=True)
    new_weight, new_bias = algo._inner_step(features, labels, weight, bias, create_graph=False)
    error = torch.softmax(features @ weight.detach().transpose(1, 2) + bias.detach().unsqueeze(1), -1)
    error = error - F.one_hot(labels, WAYS).double()
    n = WAYS * shots
    torch.testing.assert_close(new_weight, weight.detach() - 0.3 * error.transpose(1, 2) @ features / n)
    torch.testing.assert_close(new_bias, bias.detach() - 0.3 * error.sum(1) / n)


def test_test_adapts_the_head_alone_and_reports_every_step():
    torch.manual_seed(0)
    algo = ANIL(conv4(), WAYS, eval_inner_steps=4, inner_lr=0.5)
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    episode = random_episode(tasks=3, seed=4)
    with torch.no_grad():  # the engine's evaluation runs under no_grad; the head's inner loop still differentiates
        out = algo(episode, train=False)
    assert out.step_score.shape == (3, 5) and torch.equal(out.step_score[:, -1], out.score)
    assert not torch.equal(out.step_score[:, 0], out.step_score[:, -1])  # the steps changed answers
    assert all(torch.equal(v, before[k]) for k, v in algo.state_dict().items())  # the meta-weights are untouched
    # Adapting the head by hand on the body's features gives the same final query accuracy
    support = torch.stack([algo.body(x) for x in episode.support_x]).detach()
    query = torch.stack([algo.body(x) for x in episode.query_x]).detach()
    weight, bias = algo.head.weight.expand(3, -1, -1), algo.head.bias.expand(3, -1)
    for _ in range(4):
        weight, bias = (t.detach().requires_grad_() for t in (weight, bias))
        loss = sum(F.cross_entropy(head_logits(support, weight, bias)[t], episode.support_y[t]) for t in range(3))
        g_weight, g_bias = torch.autograd.grad(loss, (weight, bias))
        weight, bias = weight - 0.5 * g_weight, bias - 0.5 * g_bias
    logits = head_logits(query, weight, bias).detach()
    torch.testing.assert_close(out.score, (logits.argmax(-1) == episode.query_y).float().mean(-1))
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten()))


def test_no_test_steps_scores_the_unadapted_head():
    torch.manual_seed(0)
    algo = ANIL(conv4(), WAYS, eval_inner_steps=0)
    episode = random_episode(tasks=2, seed=5)
    out = algo(episode, train=False)
    query = torch.stack([algo.body(x) for x in episode.query_x])
    logits = algo.head(query)
    assert out.step_score.shape == (2, 1) and torch.equal(out.step_score[:, 0], out.score)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten()))


def test_a_backbone_without_a_linear_head_is_refused():
    class Bare(nn.Module):
        def __init__(self, out_features=None):
            super().__init__()
            self.features = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"ANIL adapts a linear head, and this backbone \(Bare\) has none"):
        ANIL(functools.partial(Bare), WAYS)
