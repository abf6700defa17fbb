"""Datasets as device-resident image banks, and the batched episode sampler.

Layers, each importing only those before it: base (containers) <- io (downloads, archives, pickles, caches)
and sampler <- dataset (FewShotDataset) <- the dataset modules, which only parse their format."""

from fewshot.data.base import Episode, SplitBank
from fewshot.data.dataset import FewShotDataset
from fewshot.data.sampler import EpisodeSampler

__all__ = ["Episode", "EpisodeSampler", "FewShotDataset", "SplitBank"]
