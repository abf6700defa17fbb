"""The containers every sampler and algorithm consumes: a split's image bank and a meta-batch of tasks.

The lowest layer of fewshot.data: it imports nothing of the package, so the sampler and the data I/O layer
build on it and FewShotDataset (fewshot.data.dataset) on those."""

from __future__ import annotations

from dataclasses import dataclass
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
            raise ValueError(
                f"SplitBank.images must be uint8 (classes, per_class, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def images_per_class(self) -> int:
        return self.images.shape[1]


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

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def copy_(self, other: "Episode") -> "Episode":
        """other's tensors copied into this episode's (a CUDA graph's static inputs); returns self."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    def to(self, device: torch.device | str) -> "Episode":
        moved = (t.to(device, non_blocking=True) for t in self.tensors())
        return Episode(*moved, ways=self.ways)
