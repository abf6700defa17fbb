"""The containers every dataset loader returns and every sampler and algorithm consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fewshot.errors import FewshotError


class DataError(FewshotError):
    """Data is missing, corrupt or does not fit the request; the message says what to change."""


@dataclass
class SplitBank:
    """One split of a dataset, held as a single uint8 tensor.

    images: (classes, images_per_class, C, H, W) uint8.
    rotate: draw one rotation of 0/90/180/270 degrees per class per task (Finn et al.'s
        Omniglot augmentation), applied by the sampler on the device.
    """

    images: torch.Tensor
    class_names: list[str]
    rotate: bool = False

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(f"SplitBank.images must be uint8 (classes, per_class, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def images_per_class(self) -> int:
        return self.images.shape[1]


@dataclass
class FewShotDataset:
    """A dataset's train/val/test splits plus what a backbone needs to know about its images.

    mean/std: per-channel normalization applied after scaling uint8 to [0, 1].
    """

    name: str
    splits: dict[str, SplitBank]
    channels: int
    image_size: int
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def split(self, name: str) -> SplitBank:
        if name not in self.splits:
            raise DataError(f"dataset {self.name} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        """Raise DataError before any training when this episode shape cannot be drawn from `split`."""
        from fewshot.data.sampler import check_episode_fits

        check_episode_fits(self.split(split), ways, shots, queries, split)

    def sampler(self, split: str, ways: int, shots: int, queries: int, device, seed: int):
        """The episode sampler for a split: the engine only calls this, so a dataset of another kind
        (MAML's sinusoid) provides its own sampler with the same sample(tasks) -> Episode call."""
        from fewshot.data.sampler import EpisodeSampler

        return EpisodeSampler(self.split(split), ways, shots, queries, device=device, seed=seed,
                              mean=self.mean, std=self.std, split=split)


@dataclass
class Episode:
    """A meta-batch of tasks, every tensor with a leading task dimension T.

    support_x: (T, ways*shots, C, H, W) float    support_y: (T, ways*shots) int64 in 0..ways-1
    query_x:   (T, ways*queries, C, H, W) float  query_y:   (T, ways*queries) int64
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: Optional[int] = None  # classes per task, when the sampler knows it (saves a device sync)

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def num_ways(self) -> int:
        return self.ways if self.ways is not None else int(self.support_y.max()) + 1

    def to(self, device: torch.device | str) -> "Episode":
        moved = (t.to(device, non_blocking=True) for t in (self.support_x, self.support_y, self.query_x, self.query_y))
        return Episode(*moved, ways=self.ways)
