"""Siamese networks for one-shot image recognition (Koch, Zemel, Salakhutdinov 2015).

The paper: twin towers with shared weights embed two images; the pair score is
p(a, b) = sigmoid(sum_j alpha_j |f(a)_j - f(b)_j| + bias), a weighted L1 distance through one unit, trained with
binary cross-entropy on same/different pairs (balanced minibatches of 128 pairs), each pair distorted by a random
affine transform (rotation +-10 deg, shears +-0.3, scales 0.8-1.2, shifts +-2 px on 105x105 drawings, each of
the seven components included with probability 0.5). One-shot test: the support drawing with the highest score.

In fewshot (and why):
- Pairs come from episodes: every query is paired with every support item of its task, so the standard N-way
  K-shot sampler, validation and `fewshot-eval benchmark=lake_runs` all use this one forward call. A task has
  N times more different pairs than same pairs; the loss gives the two halves equal weight (the mean BCE of the
  same pairs plus that of the different pairs, halved), the expectation of the paper's balanced minibatches.
- Each image is embedded once per episode and its embedding reused in all its pairs (the towers share weights,
  so that equals running the twins per pair). Distortions are therefore drawn per image, not per pair: an
  image carries the same distortion in all its pairs of one episode. Done on the device (affine_grid +
  grid_sample, border padding since normalised background is not 0), in training only; `augment=false` turns
  them off. Shifts are given in pixels of the 105x105 drawing and scaled to the image size.
- K-shot: a class's score is the mean pair probability over its K support items (Koch only does one-shot).
- The paper's optimiser (SGD with momentum, per-layer learning rates and L2) is left to optim/ (see the presets).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.protonet import embed_tasks, one_hot
from fewshot.data.base import Episode

PAPER_SIZE = 105  # the drawings' size, in whose pixels `shift` is given


def affine_params(
    n: int,
    rotation: float,
    shear: float,
    scale: float,
    shift: float,
    p: float = 0.5,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n, 7) random distortions [theta (degrees), rho_x, rho_y, s_x, s_y, t_x, t_y (pixels)], each component
    uniform in its range (theta in +-rotation, rho in +-shear, s in 1 +- scale, t in +-shift) with probability p
    and the identity's value (0, 0, 0, 1, 1, 0, 0) otherwise."""
    # Column by column with Python scalars: no host-to-device copy, so a CUDA graph can capture the draw.
    half = (rotation, shear, shear, scale, scale, shift, shift)
    identity = (0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    u = torch.rand(n, 7, generator=generator, device=device) * 2 - 1
    on = torch.rand(n, 7, generator=generator, device=device) < p
    return torch.stack([torch.where(on[:, j], u[:, j] * half[j], 0.0) + identity[j] for j in range(7)], -1)


def affine_theta(params: torch.Tensor, size: int) -> torch.Tensor:
    """Distortions (n, 7) -> affine_grid's (n, 2, 3) for size x size images.

    The content moves by x -> R(theta) Shear(rho) Scale(s) x + t about the image centre, t in pixels; affine_grid
    wants the inverse map (output to input location) in coordinates where one pixel is 2 / size wide."""
    theta, rx, ry, sx, sy, tx, ty = params.unbind(-1)
    theta = theta * (math.pi / 180)
    cos, sin, one = theta.cos(), theta.sin(), torch.ones_like(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.stack([torch.stack([one, rx], -1), torch.stack([ry, one], -1)], -2)
    scaling = torch.diag_embed(torch.stack([sx, sy], -1))
    m = rot @ shear @ scaling  # (n, 2, 2)
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    # The 2x2 inverse in closed form: torch.linalg.inv checks for singular matrices on the host (a device sync).
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (a * d - b * c)[:, None, None]
    t = torch.stack([tx, ty], -1).unsqueeze(-1) * (2 / size)  # (n, 2, 1)
    return torch.cat([inverse, -inverse @ t], -1)


def distort(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply distortions (n, 7) to images (n, C, H, W) (square), bilinear, padding with the border's value."""
    theta = affine_theta(params, images.shape[-1]).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Siamese(Algorithm):
    """Weighted-L1 siamese verification net; one-shot prediction = the support item (class) with the best score.

    augment: the paper's affine distortions in training (never at validation or test).
    rotation, shear, scale, shift: their ranges (+-degrees, +-shear, 1 +- scale, +-pixels at 105x105).
    augment_p: the probability that each of the seven components is drawn (otherwise identity).
    """

    running_stats_ok = True  # embed_tasks runs the backbone as a module
    # NHWC on a CPU: its tests 1.79-1.85x faster, training 1.01-1.18x (5w1s, 20w1s; bench_channels_last.py)
    cpu_channels_last = True

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        augment: bool = True,
        rotation: float = 10.0,
        shear: float = 0.3,
        scale: float = 0.2,
        shift: float = 2.0,
        augment_p: float = 0.5,
    ) -> None:
        super().__init__()
        ranges = {"rotation": rotation, "shear": shear, "shift": shift}
        for key, value in ranges.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Siamese {key}={value}: must be a finite number >= 0")
        if not (isinstance(scale, (int, float)) and 0 <= scale < 1):
            raise ValueError(f"Siamese scale={scale}: scales are drawn in 1 +- scale, so it must be in [0, 1)")
        if not (isinstance(augment_p, (int, float)) and 0 <= augment_p <= 1):
            raise ValueError(f"Siamese augment_p={augment_p}: a probability, must be in [0, 1]")
        self.net = backbone(out_features=None)
        self.ways = ways
        self.augment = bool(augment)
        self.rotation, self.shear, self.scale, self.shift, self.augment_p = rotation, shear, scale, shift, augment_p
        # alpha_j and the bias: the one unit that weighs the L1 distance's components (the paper's head).
        self.head = nn.Linear(self.net.embedding_dim, 1)

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, augment={self.augment}, rotation={self.rotation}, shear={self.shear}, "
            f"scale={self.scale}, shift={self.shift}, augment_p={self.augment_p}"
        )

    def distorted(self, x: torch.Tensor) -> torch.Tensor:
        """A random distortion per image of (T, N, C, H, W)."""
        flat = x.flatten(0, 1)
        shift = self.shift * flat.shape[-1] / PAPER_SIZE
        params = affine_params(
            flat.shape[0], self.rotation, self.shear, self.scale, shift, self.augment_p, device=x.device
        )
        return distort(flat, params).view_as(x)

    def pair_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Embeddings (T, S, D), (T, Q, D) -> (T, Q, S) logits sum_j alpha_j |q_j - s_j| + bias."""
        return self.head((query.unsqueeze(2) - support.unsqueeze(1)).abs()).squeeze(-1)

    @staticmethod
    def pair_loss(logits: torch.Tensor, support_y: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Balanced BCE: per task, half the mean over same pairs plus half the mean over different pairs."""
        same = (query_y.unsqueeze(2) == support_y.unsqueeze(1)).to(logits.dtype)  # (T, Q, S)
        bce = F.binary_cross_entropy_with_logits(logits, same, reduction="none")
        n_same = same.sum((1, 2)).clamp_min(1)
        n_diff = (1 - same).sum((1, 2)).clamp_min(1)
        per_task = 0.5 * (bce * same).sum((1, 2)) / n_same + 0.5 * (bce * (1 - same)).sum((1, 2)) / n_diff
        return per_task.mean()

    @staticmethod
    def class_scores(logits: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
        """(T, Q, S) pair logits -> (T, Q, ways): the mean pair probability over each class's support items."""
        onehot = one_hot(support_y, ways, logits.dtype)  # (T, S, ways)
        return logits.sigmoid() @ onehot / onehot.sum(1, keepdim=True).clamp_min(1)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        support_x, query_x = episode.support_x, episode.query_x
        if train and self.augment:
            support_x, query_x = self.distorted(support_x), self.distorted(query_x)
        with contextlib.nullcontext() if train else torch.no_grad():
            support, query = embed_tasks(self.net, support_x, query_x)
            logits = self.pair_logits(support, query)
            loss = self.pair_loss(logits, episode.support_y, episode.query_y)
        scores = self.class_scores(logits.detach(), episode.support_y, episode.num_ways())
        return AlgoOutput(loss=loss, score=accuracy(scores, episode.query_y))
