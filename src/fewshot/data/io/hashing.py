"""File digests and the one fingerprint scheme that names every decode cache (source files + preprocessing)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

_FULL_HASH_LIMIT = 64 << 20
_SAMPLE = 1 << 20


def file_hash(path: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's content, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_signature(path: Path) -> str:
    """Content signature of one source file, cheap enough to compute on every load.

    Files up to 64 MiB: sha1 of the whole content. Larger ones (GB-sized pickles): size, mtime and the sha1 of
    three 1 MiB samples (start, middle, end), so a replaced or re-downloaded file gets a new cache.
    """
    st = path.stat()
    h = hashlib.sha1()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return f"{path.name}:{st.st_size}:{h.hexdigest()}"
        for offset in (0, st.st_size // 2, st.st_size - _SAMPLE):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def fingerprint(
    tag: str, version: int, params: Mapping[str, Any], files: Iterable[Path] = (), extra: Iterable[str] = ()
) -> str:
    """Hash of the source files' signatures, extra strings (e.g. stats of an image folder) and the preprocessing.

    16 hex digits: it names the cache file and is stored in it, so a cache is only read for the same sources."""
    h = hashlib.sha1(f"{tag}|v{version}|{sorted(params.items())!r}".encode())
    for p in files:
        h.update(f"|{file_signature(p)}".encode())
    for s in extra:
        h.update(f"|{s}".encode())
    return h.hexdigest()[:16]
