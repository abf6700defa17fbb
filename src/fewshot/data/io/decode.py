"""Image decoding into uint8 banks: the one thread pool every loader decodes or resizes with, Lanczos resizing,
and the (classes, per_class, C, H, W) layout."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fewshot.bars import tqdm
from fewshot.data.base import DataError


def fill_parallel(count: int, work: Callable[[int], None], desc: str) -> None:
    """Run work(i) for i in range(count) on a few threads (Pillow releases the GIL), with a progress bar.

    The first exception work raises is re-raised here, after the pool has finished its running chunks."""
    workers = max(1, min(8, os.cpu_count() or 1))
    step = 256
    with tqdm(total=count, desc=desc, unit="img", leave=False) as bar, ThreadPoolExecutor(max_workers=workers) as pool:

        def chunk(start: int) -> int:
            stop = min(count, start + step)
            for i in range(start, stop):
                work(i)
            return stop - start

        for n in pool.map(chunk, range(0, count, step)):
            bar.update(n)  # in this thread: the bar is never touched by a pool thread


def resize_hwc(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with Lanczos (antialiased); unchanged when already that size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> (size, size, 3) uint8 RGB, resized with Lanczos when needed."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def resize_banks(images: np.ndarray, size: int, desc: str) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) with Lanczos per image (a no-op at the stored size)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = resize_hwc(images[i], size)

    fill_parallel(images.shape[0], work, desc)
    return out


def to_bank(images_nhwc: np.ndarray, classes: int, per_class: int) -> torch.Tensor:
    """(classes*per_class, H, W, C) uint8 in class-major order -> (classes, per_class, C, H, W) contiguous tensor."""
    n, h, w, c = images_nhwc.shape
    assert n == classes * per_class
    bank = images_nhwc.reshape(classes, per_class, h, w, c).transpose(0, 1, 4, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(bank))


def corrupt(path: Path, what: str, e: BaseException) -> DataError:
    return DataError(f"cannot decode {what} from {path} ({type(e).__name__}: {e}); replace the file with the original")
