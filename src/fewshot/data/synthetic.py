"""A small generated dataset that a conv net learns in seconds: for fast, real tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.data.base import SplitBank
from fewshot.data.dataset import FewShotDataset, task_source


@task_source
def load_synthetic(
    train_classes: int = 64,
    val_classes: int = 16,
    test_classes: int = 20,
    images_per_class: int = 20,
    image_size: int = 28,
    channels: int = 1,
    noise: float = 0.25,
    seed: int = 0,
) -> FewShotDataset:
    """Each class is a random 7x7 binary pattern upsampled to image_size; each image adds pixel noise and
    a random shift of up to 2 pixels. Classes are disjoint across splits by construction."""
    g = torch.Generator().manual_seed(seed)
    total = train_classes + val_classes + test_classes
    patterns = (torch.rand(total, channels, 7, 7, generator=g) > 0.5).float()
    protos = F.interpolate(patterns, size=(image_size, image_size), mode="nearest")  # (classes, C, S, S)
    x = protos.unsqueeze(1).expand(-1, images_per_class, -1, -1, -1).clone()  # (classes, per_class, C, S, S)
    shifts = torch.randint(-2, 3, (total, images_per_class, 2), generator=g)
    for c in range(total):
        for i in range(images_per_class):
            x[c, i] = torch.roll(x[c, i], shifts=tuple(shifts[c, i].tolist()), dims=(-2, -1))
    x = (x + noise * torch.randn(x.shape, generator=g)).clamp_(0, 1)
    images = (x * 255).round().to(torch.uint8)
    val_end = train_classes + val_classes
    bounds = {"train": (0, train_classes), "val": (train_classes, val_end), "test": (val_end, total)}
    splits = {
        name: SplitBank(images[a:b].contiguous(), [f"synthetic/{c:04d}" for c in range(a, b)], rotate=False)
        for name, (a, b) in bounds.items()
    }
    return FewShotDataset(
        "synthetic", splits, channels=channels, image_size=image_size, mean=(0.0,) * channels, std=(1.0,) * channels
    )
