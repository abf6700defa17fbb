"""Backbones: parameter counts match the paper's architectures and learn2learn's; every parameter learns."""

from __future__ import annotations

import warnings

import pytest
import torch

from fewshot.models.backbones import MLP, Conv4


def conv_block(cin: int, cout: int) -> int:
    return cin * cout * 9 + cout + 2 * cout  # 3x3 conv with bias, BatchNorm scale and shift


def test_conv4_omniglot_parameter_count():
    # MAML Omniglot: 4 blocks of 64 filters, mean over space -> 64 features, linear head to 5 ways.
    expected = conv_block(1, 64) + 3 * conv_block(64, 64) + 64 * 5 + 5
    assert sum(p.numel() for p in Conv4(1, 28, 5).parameters()) == expected == 112_261


def test_conv4_miniimagenet_parameter_count():
    # MAML miniImageNet: 32 filters, 2x2 max-pool; 84 -> 42 -> 21 -> 10 -> 5, so 32*5*5 = 800 features.
    net = Conv4(3, 84, 5, hidden=32, max_pool=True)
    assert net.embedding_dim == 800
    expected = conv_block(3, 32) + 3 * conv_block(32, 32) + 800 * 5 + 5
    assert sum(p.numel() for p in net.parameters()) == expected


def test_mlp_parameter_count():
    sizes = [784, 256, 128, 64, 64]
    expected = sum(a * b + b + 2 * b for a, b in zip(sizes[:-1], sizes[1:])) + 64 * 5 + 5
    assert sum(p.numel() for p in MLP(1, 28, 5).parameters()) == expected


def test_same_counts_as_learn2learn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from learn2learn.vision.models import CNN4, OmniglotCNN, OmniglotFC

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(Conv4(1, 28, 5)) == count(OmniglotCNN(output_size=5))
    assert count(Conv4(3, 84, 5, hidden=32, max_pool=True)) == count(CNN4(output_size=5, hidden_size=32))
    assert count(MLP(1, 28, 5)) == count(OmniglotFC(28 * 28, 5))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda out: Conv4(1, 28, out), (10, 1, 28, 28)),
        (lambda out: Conv4(3, 84, out, hidden=32, max_pool=True), (4, 3, 84, 84)),
        (lambda out: MLP(1, 28, out), (10, 1, 28, 28)),
    ],
)
@pytest.mark.parametrize("out", [5, None])
def test_forward_backward_every_parameter(make, shape, out):
    torch.manual_seed(0)
    net = make(out)
    y = net(torch.randn(shape))
    assert y.shape == (shape[0], out or net.embedding_dim)
    (y**2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_statistics_in_train_and_eval():
    """BatchNorm normalises with the current batch in both modes (MAML's transductive setting)."""
    torch.manual_seed(0)
    net = Conv4(1, 28, 5)
    x = torch.randn(8, 1, 28, 28)
    a = net.train()(x)
    b = net.eval()(x)
    assert torch.allclose(a, b)
    assert not any(n.endswith("running_mean") for n, _ in net.named_buffers())
