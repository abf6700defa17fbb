"""Batched episode sampler: a whole split lives on the device and a meta-batch is one gather."""

from __future__ import annotations

import hashlib
import logging
from typing import Optional, Sequence

import torch

from fewshot.data.base import DataError, Episode, SplitBank

log = logging.getLogger(__name__)


def check_episode_fits(bank: SplitBank, ways: int, shots: int, queries: int, split: str = "split") -> None:
    """Raise DataError, before any training, when the episode shape cannot be drawn from this split."""
    for name, value in (("episode.ways", ways), ("episode.shots", shots), ("episode.queries", queries)):
        if value < 1:
            raise DataError(f"{name}={value}: must be at least 1")
    if ways < 2:
        raise DataError(f"episode.ways={ways}: a classification task needs at least 2 ways")
    if ways > bank.num_classes:
        raise DataError(
            f"episode.ways={ways} exceeds the {bank.num_classes} classes of the {split} split; lower episode.ways"
        )
    if shots + queries > bank.images_per_class:
        raise DataError(
            f"episode.shots + episode.queries = {shots} + {queries} exceeds the {bank.images_per_class} "
            f"images per class of the {split} split; lower episode.shots or episode.queries"
        )


class EpisodeSampler:
    """Draws T tasks at once from a SplitBank held on `device`.

    Each task: `ways` classes drawn without replacement in random order (class i of the draw gets label i),
    and shots + queries distinct images per class. With bank.rotate, each class of each task gets one
    rotation of 0/90/180/270 degrees (Finn et al.'s Omniglot class augmentation), applied on the device.
    All randomness comes from the sampler's own torch.Generator: the same seed gives the same episodes.
    """

    def __init__(
        self,
        bank: SplitBank,
        ways: int,
        shots: int,
        queries: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        split: str = "split",
    ) -> None:
        check_episode_fits(bank, ways, shots, queries, split)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device = torch.device(device)
        self.rotate = bank.rotate
        images = bank.images.to(self.device)  # (classes, per_class, C, H, W) uint8
        if self.rotate:
            if images.shape[-1] != images.shape[-2]:
                raise DataError("rotation augmentation needs square images")
            # All four quarter turns stored once (4x a uint8 bank: 69 MB for Omniglot's train split),
            # so drawing a rotated task is the same single gather as drawing a plain one.
            images = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(4)])
        else:
            images = images.unsqueeze(0)
        self.images = images.contiguous()  # (rotations, classes, per_class, C, H, W) uint8
        # (x / 255 - mean) / std as one fused multiply-add on the uint8 gather.
        std = torch.tensor(std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # Labels are the same for every task: class i of the draw is label i.
        self._support_y = torch.arange(ways, device=self.device).repeat_interleave(shots)  # (ways*shots,)
        self._query_y = torch.arange(ways, device=self.device).repeat_interleave(queries)  # (ways*queries,)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def sample(self, tasks: int, out: Optional[Episode] = None) -> Episode:
        """T tasks; with `out` (an Episode of this shape, e.g. a CUDA graph's static input) the images are
        written into its tensors instead of new ones, from the same draw: the generator advances alike."""
        ways, shots, queries = self.ways, self.shots, self.queries
        rotations, classes, per_class = self.images.shape[:3]
        # Random subsets via argsort of uniform noise: one kernel for all tasks, no Python loop.
        cls = self._rand(tasks, classes).argsort(dim=1)[:, :ways].unsqueeze(-1)  # (T, ways, 1)
        idx = self._rand(tasks, ways, per_class).argsort(dim=2)  # (T, ways, per_class)
        if self.rotate:  # one quarter turn per class per task, shared by its support and query images
            rot = (self._rand(tasks, ways, 1) * 4).long().clamp_(max=3)  # (T, ways, 1)
        else:
            rot = torch.zeros_like(cls)
        into_s, into_q = (None, None) if out is None else (out.support_x, out.query_x)
        support_x = self._gather(rot, cls, idx[:, :, :shots], into_s)  # (T, ways*shots, C, H, W)
        query_x = self._gather(rot, cls, idx[:, :, shots : shots + queries], into_q)  # (T, ways*queries, C, H, W)
        if out is not None:
            return out  # its labels are this sampler's fixed ones already
        return Episode(
            support_x=support_x,
            support_y=self._support_y.expand(tasks, -1),
            query_x=query_x,
            query_y=self._query_y.expand(tasks, -1),
            ways=ways,
        )

    def _gather(
        self, rot: torch.Tensor, cls: torch.Tensor, idx: torch.Tensor, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = self.images[rot, cls, idx]  # (T, ways, n, C, H, W) uint8, contiguous
        if out is not None:
            if out.shape != (x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]):
                raise ValueError(f"sample(out=...) holds {tuple(out.shape)} images, this draw {tuple(x.shape)}")
            torch.addcmul(self._shift, x, self._scale, out=out.view(x.shape))
            return out
        x = torch.addcmul(self._shift, x, self._scale)  # float32, normalized
        return x.view(x.shape[0], -1, *x.shape[3:])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "device": self.device.type}

    def load_state_dict(self, state: dict) -> bool:
        """Continue the saved episode stream; False where it cannot (see below)."""
        saved = state["generator"]
        kind = state.get("device")
        if kind is None:  # checkpoints before it was recorded: a CPU generator's state is 5056 bytes, a CUDA one's 16
            kind = self.device.type if len(saved) == len(self.generator.get_state()) else "another kind of device"
        if kind == self.device.type:
            self.generator.set_state(saved)
            return True
        # A CUDA generator's (seed, offset) cannot go on as a CPU Mersenne Twister, nor the reverse: draw from a
        # stream seeded by the saved state, the same stream each time this checkpoint resumes on this kind of device.
        seed = int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little") & (2**63 - 1)
        self.generator.manual_seed(seed)
        log.warning(
            "the training episodes were drawn on %s and go on on %s: a new episode stream from here, seeded by the "
            "saved one (the same on every resume here), not the one an uninterrupted run would have drawn",
            kind, self.device.type,
        )  # fmt: skip
        return False


def batch_sizes(episodes: int, batch: int):
    """The meta-batch sizes that cover exactly `episodes` tasks in batches of at most `batch`."""
    done = 0
    while done < episodes:
        n = min(batch, episodes - done)
        yield n
        done += n


def fixed_episodes(sampler: EpisodeSampler, episodes: int, batch: int, seed: Optional[int] = None):
    """Yield Episodes covering exactly `episodes` tasks in meta-batches of at most `batch`.

    With a seed the generator is reset first, so every call yields the same tasks (fixed
    validation and test sets)."""
    if seed is not None:
        sampler.generator.manual_seed(seed)
    for n in batch_sizes(episodes, batch):
        yield sampler.sample(n)
