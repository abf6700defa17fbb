"""Shared pieces of the image-dataset loaders (miniImageNet, CIFAR-FS/FC100, tieredImageNet).

- restricted unpickling: the datasets ship as pickles, and loading a pickle runs whatever code it names;
  ``restricted_load`` only lets through what rebuilds numpy arrays, dicts, lists and strings.
- local files or one download: ``ensure_files`` checks the files a loader needs and, when a URL is
  configured, downloads it (md5-checked, atomic: ``omniglot.download_file``) and extracts archives safely.
- decode-once caches: ``fingerprint`` names a cache file by the source files and the preprocessing;
  ``read_splits_cache`` / ``write_cache`` keep the decoded uint8 banks as one torch file (atomic writes,
  ``torch.load(weights_only=True)``), like the Omniglot cache.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fewshot.data.cachefile import is_uint8_bank, read_cache, write_cache  # noqa: F401  (write_cache: used as C.write_cache)
from fewshot.data.base import DataError, SplitBank
from fewshot.data.omniglot import download_file, file_hash, safe_extract

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# --------------------------------------------------------------------------------------------- unpickling


def _numpy_attr(module: str, name: str) -> Any:
    """numpy.<module>.<name> under either spelling: numpy 2 pickles name numpy._core, older ones numpy.core."""
    import importlib

    for mod in (f"numpy._core.{module}", f"numpy.core.{module}"):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(mod), name)
    raise DataError(f"this numpy has no {module}.{name}")  # pragma: no cover - every numpy since 1.x has both


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 pickles at protocol <= 2 call to rebuild bytes (_codecs.encode), limited to latin-1."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}, {errors!r}) is not allowed")
    return text.encode("latin1")


# (module, name) -> how to get the object. Nothing here can run code of the pickle's choosing: these only
# rebuild arrays (from a dtype and raw bytes), dtypes, numpy scalars and bytes.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_attr("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_attr("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr("numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,  # bytes in Python 3 pickles of protocol 0-2
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds numpy arrays, dicts, lists, tuples, strings and numbers, and nothing else.

    Any other global (os.system, builtins.eval, a class of the pickle's choosing, ...) raises
    pickle.UnpicklingError before it is looked up, so no code of the file's choosing runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        getter = _ALLOWED.get((module, name))
        if getter is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return getter()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")


def restricted_load(path: str | os.PathLike[str], what: str) -> Any:
    """Unpickle path with RestrictedUnpickler (encoding latin1, so Python 2 pickles load too).

    Python 2 ``str`` values come back as ``str`` decoded as latin-1 (``.encode('latin1')`` restores the bytes);
    numpy arrays pickled by Python 2 load intact. Raises DataError naming the file for anything refused,
    truncated or unreadable.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(
            f"refusing to load {path} ({e}): {what} pickles hold only numpy arrays, lists and dicts; "
            f"this file may be corrupt or malicious, replace it with the original"
        ) from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"cannot read {path} as a {what} pickle ({type(e).__name__}: {e}); replace it with the original") from e
    except OSError as e:
        raise DataError(f"cannot read {path} ({e})") from e


def get_key(d: Any, key: str, path: Path, what: str) -> Any:
    """d[key] for a dict from a pickle, whose keys may be str (Python 3, or latin1-decoded Python 2) or bytes."""
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, not the dict a {what} file holds; replace it with the original")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    keys = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in d))
    raise DataError(f"{path} has no {key!r} entry (it has: {keys}); it is not a {what} file, replace it with the original")


def as_text(value: Any) -> str:
    """A class name from a pickle: bytes and numpy strings become str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


# --------------------------------------------------------------------------------------------- local files or download

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def _is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def safe_extract_archive(archive: Path, dest: Path) -> None:
    """Extract a tar or zip into dest, refusing entries that would land outside it, links and device files."""
    if archive.name.lower().endswith(".zip"):
        safe_extract(archive, dest)
        return
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                norm = m.name.replace("\\", "/")
                if norm.startswith("/") or ".." in norm.split("/") or not (m.isfile() or m.isdir()):
                    raise DataError(
                        f"{archive} has an entry {m.name!r} that is a link, a device or points outside its folder; "
                        f"the archive is corrupt or malicious, delete it and download it again"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive} into {dest} ({e}); delete the archive and download it again") from e


def ensure_files(required: Sequence[Path], root: Path, url: str | None, md5: str | None, what: str, hint: str = "") -> None:
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
        raise DataError(f"{what} not found: put {paths} there{hint}, or set the dataset's url (and md5) to download them")
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = root / name
    if dest.is_file() and md5 is not None and file_hash(dest, "md5") != md5.lower():
        log.warning("%s does not match md5 %s; downloading it again from %s", dest, md5, url)
        dest.unlink()
    if not dest.is_file():
        log.info("downloading %s from %s to %s", what, url, dest)
        try:
            download_file(url, dest, md5)
        except DataError as e:
            raise DataError(f"{what}: {e}; it should provide {paths}") from e
    if _is_archive(name):
        safe_extract_archive(dest, root)
    missing = [p for p in required if not p.exists()]
    if missing:
        raise DataError(
            f"{what}: {url} (saved as {dest}) did not provide {', '.join(str(p) for p in missing)}; "
            f"put those files there by hand{hint} or fix the dataset's url"
        )


# --------------------------------------------------------------------------------------------- fingerprints and cache

_FULL_HASH_LIMIT = 64 << 20
_SAMPLE = 1 << 20


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


def fingerprint(tag: str, version: int, params: Mapping[str, Any], files: Iterable[Path] = (), extra: Iterable[str] = ()) -> str:
    """Hash of the source files' signatures, extra strings (e.g. stats of an image folder) and the preprocessing."""
    h = hashlib.sha1(f"{tag}|v{version}|{sorted(params.items())!r}".encode())
    for p in files:
        h.update(f"|{file_signature(p)}".encode())
    for s in extra:
        h.update(f"|{s}".encode())
    return h.hexdigest()[:16]


def read_splits_cache(path: Path, fp: str, version: int, what: str, channels: int, image_size: int) -> dict[str, Any] | None:
    """The cached payload (with 'splits': {split: {'images', 'class_names'}}), or None to rebuild it."""

    def valid(data: dict) -> bool:
        return all(
            is_uint8_bank(e["images"], (len(e["class_names"]), e["images"].shape[1], channels, image_size, image_size))
            for e in (data["splits"][split] for split in SPLITS)
        )

    return read_cache(path, fp, version, what, valid, mmap=True)


def banks_from_payload(payload: Mapping[str, Any]) -> dict[str, SplitBank]:
    return {s: SplitBank(images=payload["splits"][s]["images"], class_names=list(payload["splits"][s]["class_names"])) for s in SPLITS}


# --------------------------------------------------------------------------------------------- images


def check_normalization(mean: Sequence[float], std: Sequence[float], channels: int, what: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != channels or len(std_t) != channels or any(s <= 0 for s in std_t):
        raise DataError(f"{what}: mean {list(mean_t)} and std {list(std_t)} must have {channels} values each, std positive")
    return mean_t, std_t


def check_image_size(image_size: int, what: str) -> None:
    if image_size < 1:
        raise DataError(f"{what} image_size must be positive, got {image_size}")


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


def fill_parallel(count: int, work: Callable[[int], None], desc: str) -> None:
    """Run work(i) for i in range(count) on a few threads (Pillow releases the GIL), with a progress bar."""
    workers = max(1, min(8, os.cpu_count() or 1))
    step = 256
    with tqdm(total=count, desc=desc, unit="img", leave=False) as bar, ThreadPoolExecutor(max_workers=workers) as pool:

        def chunk(start: int) -> int:
            stop = min(count, start + step)
            for i in range(start, stop):
                work(i)
            return stop - start

        for n in pool.map(chunk, range(0, count, step)):
            bar.update(n)


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
    return torch.from_numpy(np.ascontiguousarray(images_nhwc.reshape(classes, per_class, h, w, c).transpose(0, 1, 4, 2, 3)))


def corrupt(path: Path, what: str, e: BaseException) -> DataError:
    return DataError(f"cannot decode {what} from {path} ({type(e).__name__}: {e}); replace the file with the original")


__all__ = [
    "SPLITS", "RestrictedUnpickler", "restricted_load", "get_key", "as_text", "ensure_files", "safe_extract_archive",
    "file_signature", "fingerprint", "read_splits_cache", "write_cache", "banks_from_payload", "check_normalization",
    "check_image_size", "resize_hwc", "decode_image", "fill_parallel", "resize_banks", "to_bank", "corrupt",
]
