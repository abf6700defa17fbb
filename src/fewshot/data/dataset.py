"""FewShotDataset, what every dataset loader returns, and what the image loaders share to build one: the split
names, the argument checks, and the layout of a cached payload of split banks.

It sits above the sampler (base <- sampler <- dataset), so no module of fewshot.data imports another in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from fewshot.data.base import DataError, SplitBank
from fewshot.data.io.cache import is_uint8_bank
from fewshot.data.sampler import EpisodeSampler, check_episode_fits

SPLITS: tuple[str, ...] = ("train", "val", "test")


@runtime_checkable
class TaskSource(Protocol):
    """What the engine asks of a `dataset` choice: tasks of a split, drawn on a device. Image datasets are
    FewShotDataset banks; generated task distributions (MAML's sinusoids, fewshot.data.sinusoid) draw their own.

    channels, image_size: the input a backbone is built for (one number, for the sinusoids: 1 x 1 x 1)."""

    name: str
    channels: int
    image_size: int

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None: ...

    def sampler(self, split: str, ways: int, shots: int, queries: int, device: Any, seed: int) -> Any: ...


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
        check_episode_fits(self.split(split), ways, shots, queries, split)

    def sampler(self, split: str, ways: int, shots: int, queries: int, device, seed: int) -> EpisodeSampler:
        """The episode sampler for a split: the engine only calls this, so a dataset of another kind
        (MAML's sinusoid) provides its own sampler with the same sample(tasks) -> Episode call."""
        return EpisodeSampler(
            self.split(split), ways, shots, queries, device=device, seed=seed, mean=self.mean, std=self.std, split=split
        )


def check_normalization(
    mean: Sequence[float], std: Sequence[float], channels: int, what: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != channels or len(std_t) != channels or any(s <= 0 for s in std_t):
        raise DataError(
            f"{what}: mean {list(mean_t)} and std {list(std_t)} must have {channels} values each, std positive"
        )
    return mean_t, std_t


def check_image_size(image_size: int, what: str) -> None:
    if image_size < 1:
        raise DataError(f"{what} image_size must be positive, got {image_size}")


def splits_payload_valid(channels: int, image_size: int) -> Callable[[dict], bool]:
    """Whether a cached payload's 'splits' ({split: {'images', 'class_names'}}) hold banks of this image shape."""

    def valid(data: dict) -> bool:
        return all(
            is_uint8_bank(e["images"], (len(e["class_names"]), e["images"].shape[1], channels, image_size, image_size))
            for e in (data["splits"][split] for split in SPLITS)
        )

    return valid


def banks_from_payload(payload: Mapping[str, Any]) -> dict[str, SplitBank]:
    splits = payload["splits"]
    return {s: SplitBank(images=splits[s]["images"], class_names=list(splits[s]["class_names"])) for s in SPLITS}


def task_source(loader: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a dataset module's loader as a choice of the `dataset` config group: its signature becomes the schema
    `schema_dataset_<name without load_>` (fewshot.schemas), so its defaults live only in the signature."""
    loader.task_source = True  # type: ignore[attr-defined]
    return loader
