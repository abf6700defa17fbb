"""The convolutional tower of Siamese networks for one-shot recognition (Koch, Zemel, Salakhutdinov 2015, Figure 4).

On 105x105 Omniglot drawings: 64@10x10 conv, ReLU, 2x2 max-pool; 128@7x7, ReLU, max-pool; 128@4x4, ReLU,
max-pool; 256@4x4, ReLU; flatten (256 x 6 x 6 = 9216); a fully connected layer of 4096 sigmoid units. With the
siamese head (fewshot.algorithms.siamese, one weighted-L1 unit) that is the paper's 38,951,745 parameters.

Initialisation as in the paper (Section 3.3): conv weights N(0, 0.01), all biases N(0.5, 0.01), the fully
connected weights N(0, 0.2). `paper_init=False` keeps PyTorch's default initialisation instead.

Same constructor interface as fewshot.models.backbones.Conv4: in_channels and image_size come from the dataset,
out_features=None gives the 4096-d embedding (what the siamese algorithm uses) and an int adds a linear head.
`hidden` scales the conv widths (hidden, 2, 2, 4 x hidden; the paper's 64 by default) so that smoke runs can use
a narrow tower; `features` is the width of the sigmoid layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# (kernel, width as a multiple of `hidden`, max-pool after) for the paper's four conv layers.
LAYERS = ((10, 1, True), (7, 2, True), (4, 2, True), (4, 4, False))


class Koch(nn.Module):
    """Koch et al.'s siamese tower: 4 valid convolutions (ReLU, max-pool after the first three), FC + sigmoid."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 105,
        out_features: Optional[int] = None,
        hidden: int = 64,
        features: int = 4096,
        paper_init: bool = True,
    ) -> None:
        super().__init__()
        if hidden < 1 or features < 1:
            raise ValueError(f"Koch needs hidden >= 1 and features >= 1, got hidden={hidden}, features={features}")
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for kernel, multiple, pool in LAYERS:
            size = size - kernel + 1  # valid convolutions, as in the paper
            if pool:
                size //= 2
            if size < 1:
                raise ValueError(f"Koch tower: image_size={image_size} is too small (the paper uses 105)")
            blocks += [nn.Conv2d(channels, hidden * multiple, kernel), nn.ReLU()]
            if pool:
                blocks.append(nn.MaxPool2d(2))
            channels = hidden * multiple
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(channels * size * size, features), nn.Sigmoid())
        self.embedding_dim = features
        self.head = nn.Linear(features, out_features) if out_features else None
        if paper_init:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.normal_(m.weight, 0.0, 0.2 if isinstance(m, nn.Linear) else 0.01)
                    nn.init.normal_(m.bias, 0.5, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, out_features or features)
        h = self.fc(self.features(x))
        return self.head(h) if self.head is not None else h
