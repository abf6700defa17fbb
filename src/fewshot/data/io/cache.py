"""Decoded-image cache files: one torch file per source fingerprint, written atomically, read weights-only.

Every dataset goes through ``cached``: read the cache for this fingerprint, else decode, save, log. Each loader
only says how to decode and what a valid payload looks like.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fewshot.atomic import atomic_write, remove_stale_temporaries
from fewshot.data.base import DataError

log = logging.getLogger(__name__)

# A cache temporary untouched this long belongs to a killed writer: a live one keeps writing to it (and thus its
# mtime fresh) until it renames it into place. Younger ones may be another process's cache being written now.
STALE_TEMPORARY_SECONDS = 600


def is_uint8_bank(images: Any, shape: tuple) -> bool:
    return isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == tuple(shape)


def read_cache(
    path: Path, fingerprint: str, version: int, what: str, valid: Callable[[dict], bool], mmap: bool = False
) -> Optional[dict[str, Any]]:
    """The cached payload, or None (then the caller rebuilds it) when the file is missing, unreadable, for another
    fingerprint or format version, or when valid(payload) says its contents have the wrong shape."""
    for stale in remove_stale_temporaries(path.parent, "*.pt", older_than=STALE_TEMPORARY_SECONDS):
        log.info("removed %s, left by a cache write that was killed", stale)
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        ok = data.get("fingerprint") == fingerprint and data.get("format_version") == version and valid(data)
    except Exception as e:  # noqa: BLE001 - any unreadable cache is simply rebuilt
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, path, e)
        return None
    if not ok:
        log.warning("%s cache %s is stale; rebuilding it", what, path)
        return None
    return data


def write_cache(path: Path, payload: dict, what: str) -> None:
    """Save atomically: readers never see a partial cache; a full or read-only disk says what to change."""
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise DataError(
            f"cannot write the {what} cache {path} ({e}); set cache_dir to a writable folder with enough space"
        ) from e


def cached(
    path: Path,
    fingerprint: str,
    version: int,
    what: str,
    valid: Callable[[dict], bool],
    decode: Callable[[], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    mmap: bool = False,
) -> dict[str, Any]:
    """The payload cached at path for this fingerprint and format version, else decode() saved there first.

    decode: the payload's contents (it raises DataError for bad sources, before anything is written); the
        fingerprint and version are added here. describe(payload): what the log says was decoded ("N images").
    mmap: map a read cache instead of loading it (GB-sized banks stay in the page cache).
    """
    payload = read_cache(path, fingerprint, version, what, valid, mmap=mmap)
    if payload is not None:
        log.debug("%s loaded from cache %s", what, path)
        return payload
    start = time.perf_counter()
    payload = {"format_version": version, "fingerprint": fingerprint, **decode()}
    write_cache(path, payload, what)
    log.info("decoded %s (%s) in %.1fs into %s", what, describe(payload), time.perf_counter() - start, path)
    return payload
