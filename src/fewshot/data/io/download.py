"""Downloads that leave either nothing or a complete, verified file, and the "local files or one download" step.

torchvision.datasets.utils.download_url does not fit the download itself: it writes straight to the target (a
kill leaves a partial file that a later check_integrity without md5 accepts), has no timeout, retries https as
plain http and raises bare RuntimeErrors. So the streaming download stays ours, written through
fewshot.atomic.atomic_write (temp file, fsync, rename) with length and md5 checked while streaming;
torchvision's check_integrity verifies a file already on disk.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from fewshot.atomic import atomic_write
from fewshot.bars import tqdm
from fewshot.data.base import DataError
from fewshot.data.io.archives import is_archive, safe_extract_archive

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class _DownloadFailed(Exception):
    """Network-side failure (refused, timeout, HTTP error, truncated body); callers turn it into a DataError."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # error messages stay on one line


def _stream(url: str, out, name: str, timeout: float) -> str:
    """Copy url's body into the open file out; return its md5. Network failures raise _DownloadFailed."""
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: works under FIPS too
    received = 0
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http/https URLs from config)
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _DownloadFailed(getattr(e, "reason", None) or e) from e
    except ValueError as e:  # malformed URL
        raise _DownloadFailed(e) from e
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _DownloadFailed(f"connection lost after {received} bytes ({e!r})") from e
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client does not raise when the server closes early; compare with Content-Length ourselves.
    if total is not None and received != total:
        raise _DownloadFailed(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Stream url into a temp file next to dest, check length and md5, then rename it into place (atomic_write).

    Any failure or interruption (also KeyboardInterrupt) removes the temp file, so dest is either
    absent/unchanged or complete.
    """
    started = False

    def write(out) -> None:
        nonlocal started
        started = True
        got = _stream(url, out, dest.name, timeout)
        if md5 is not None and got != md5.lower():  # raised inside atomic_write: nothing is renamed into place
            raise DataError(
                f"md5 mismatch for {dest.name} downloaded from {url}: expected {md5}, got {got}; nothing was saved, "
                f"check the URL or put the official {dest.name} at {dest} by hand"
            )

    try:
        atomic_write(dest, write)
    except OSError as e:  # network errors were turned into _DownloadFailed: this is the local disk
        if not started:  # no folder or no temp file could be made
            raise DataError(
                f"cannot write to {dest.parent} ({e}); make it writable or put {dest.name} there by hand"
            ) from e
        raise DataError(f"cannot write {dest} ({e}); free some space or make {dest.parent} writable") from e


def download_file(url: str, dest: str | os.PathLike[str], md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download url to dest atomically (temp file in dest's folder, verified, then os.replace).

    md5: expected hex digest, or None to skip the check. Raises DataError on any failure, leaving
    nothing at dest (and no temp file) behind.
    """
    dest = Path(dest).absolute()
    try:
        _fetch(url, dest, md5, timeout)
    except _DownloadFailed as e:
        raise DataError(f"could not download {url} ({e}); put that file at {dest} by hand") from e
    return dest


def download_all(items: Sequence[tuple[str, Path, str | None]], what: str, timeout: float = 60.0) -> None:
    """Download (url, dest, md5) items; on a network failure name every file still needed and where it goes."""
    for i, (url, dest, md5) in enumerate(items):
        try:
            _fetch(url, dest, md5, timeout)
        except _DownloadFailed as e:
            todo = "; ".join(f"{u} -> {d}" for u, d, _ in items[i:] if not d.exists())
            raise DataError(f"could not download {what} from {url} ({e}); put these files there by hand: {todo}") from e


def _intact(path: Path, md5: str) -> bool:
    # Imported here: torchvision.datasets costs over a second to import, and only this rare path needs it.
    from torchvision.datasets.utils import check_integrity

    return check_integrity(path, md5.lower())


def ensure_files(
    required: Sequence[Path], root: Path, url: str | None, md5: str | None, what: str, hint: str = ""
) -> None:
    """Make sure every required file (or folder) exists, downloading url into root when some are missing and url is set.

    url: one file or an archive (.tar[.gz|.bz2|.xz], .tgz, .zip; extracted into root, entries checked).
    md5: hex digest of what url serves, checked before anything is saved (None: not checked).
    Raises DataError naming every missing file's full path (and the URL when set).
    """
    missing = [p for p in required if not p.exists()]
    if not missing:
        return
    paths = ", ".join(str(p) for p in missing)
    if not url:
        raise DataError(
            f"{what} not found: put {paths} there{hint}, or set the dataset's url (and md5) to download them"
        )
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = root / name
    if dest.is_file() and md5 is not None and not _intact(dest, md5):
        log.warning("%s does not match md5 %s; downloading it again from %s", dest, md5, url)
        dest.unlink()
    if not dest.is_file():
        log.info("downloading %s from %s to %s", what, url, dest)
        try:
            download_file(url, dest, md5)
        except DataError as e:
            raise DataError(f"{what}: {e}; it should provide {paths}") from e
    if is_archive(name):
        safe_extract_archive(dest, root)
    missing = [p for p in required if not p.exists()]
    if missing:
        raise DataError(
            f"{what}: {url} (saved as {dest}) did not provide {', '.join(str(p) for p in missing)}; "
            f"put those files there by hand{hint} or fix the dataset's url"
        )
