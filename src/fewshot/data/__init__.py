"""Datasets as device-resident image banks, and the batched episode sampler."""

from fewshot.data.base import Episode, FewShotDataset, SplitBank
from fewshot.data.sampler import EpisodeSampler

__all__ = ["Episode", "EpisodeSampler", "FewShotDataset", "SplitBank"]
