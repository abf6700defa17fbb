"""The backbones of the MAML paper (Finn et al. 2017, Section 5.2).

learn2learn.vision.models has the same layer stacks (OmniglotCNN, MiniImagenetCNN, OmniglotFC), and the
tests check that our parameter counts equal theirs. We do not instantiate theirs because their conv
BatchNorm tracks running statistics: that updates buffers in place (which torch.func.vmap cannot batch)
and makes eval() use running averages, while MAML uses the current batch's statistics in training and
at test. Here every BatchNorm has track_running_stats=False, so train() and eval() behave the same, unless
Conv4's running_stats=True asks for ProtoNets' reference behaviour (the metric algorithms only).

Every factory takes in_channels and image_size (bound from the dataset by the entrypoint) and
out_features: an int gives a classifier head with that many logits, None gives the embedding only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _batch_norm(dim: int, features: int, running_stats: bool = False) -> nn.Module:
    bn = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(features, track_running_stats=running_stats)
    return bn


def tracks_running_stats(net: nn.Module) -> bool:
    """Whether a BatchNorm of `net` keeps running statistics (Conv4's running_stats=True)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in net.modules())


class Conv4(nn.Module):
    """Four [3x3 conv, BatchNorm, ReLU] blocks, then a linear head.

    max_pool=False (MAML Omniglot): stride-2 convs, then the mean over space -> (N, hidden).
    max_pool=True (MAML miniImageNet): stride-1 convs each followed by 2x2 max-pool, then flatten
        -> (N, hidden * s * s) where s = image_size halved `layers` times (5 for 84x84).
    flatten=True with stride-2 convs (Reptile's Omniglot net): flatten instead of the mean -> (N, hidden * s * s),
        s = 2 for 28x28.
    leaky_slope > 0: LeakyReLU with that negative slope instead of ReLU (MAML++'s net: 0.01).
    running_stats=True: BatchNorm keeps running statistics (momentum 0.1) and eval() normalises with them, as
        PyTorch's default BatchNorm under Snell et al.'s model.eval() at test; for the algorithms that run the
        backbone as a module (protonet, matching, siamese), not MAML's functional forward.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        out_features: Optional[int] = 5,
        hidden: int = 64,
        layers: int = 4,
        max_pool: bool = False,
        flatten: bool = False,
        leaky_slope: float = 0.0,
        running_stats: bool = False,
    ) -> None:
        super().__init__()
        if layers < 1 or hidden < 1:
            raise ValueError(f"Conv4 needs layers >= 1 and hidden >= 1, got layers={layers}, hidden={hidden}")
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(layers):
            blocks += [
                nn.Conv2d(channels, hidden, 3, stride=1 if max_pool else 2, padding=1),
                _batch_norm(2, hidden, running_stats),
                nn.LeakyReLU(leaky_slope) if leaky_slope else nn.ReLU(),
            ]
            if max_pool:
                blocks.append(nn.MaxPool2d(2))
                size = size // 2
            else:
                size = (size + 1) // 2
            channels = hidden
        self.features = nn.Sequential(*blocks)
        self.max_pool = max_pool
        self.flatten = max_pool or flatten
        self.embedding_dim = hidden * size * size if self.flatten else hidden
        if max_pool and size < 1:
            raise ValueError(f"image_size={image_size} is too small for {layers} max-pooled layers")
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)  # as learn2learn's maml_init_
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, out_features or embedding_dim)
        h = self.features(x)
        h = h.flatten(1) if self.flatten else h.mean(dim=(2, 3))
        return self.head(h) if self.head is not None else h


class MLP(nn.Module):
    """MAML's fully connected Omniglot net: [linear, BatchNorm, ReLU] x (256, 128, 64, 64), then a linear head.

    batch_norm=False drops the BatchNorm layers: MAML's sinusoid regressor is [linear, ReLU] x (40, 40), linear
    (Section 5.1), with in_channels = image_size = 1 (one input number)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        out_features: Optional[int] = 5,
        sizes: Sequence[int] = (256, 128, 64, 64),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for size in sizes:
            layers += [nn.Linear(width, size), *([_batch_norm(1, size)] if batch_norm else []), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head = nn.Linear(width, out_features) if out_features else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, out_features or embedding_dim)
        h = self.features(x)
        return self.head(h) if self.head is not None else h
