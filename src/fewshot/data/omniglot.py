"""Omniglot (Lake et al., 2015): download, decode once into a cache, and split (Finn or Vinyals).

The two zips are read in place (no extraction). All 32,460 drawings are decoded once into a single
uint8 tensor cached in ``cache_dir``; later loads only hash the zips and read that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fewshot.data.base import DataError, FewShotDataset, SplitBank
from fewshot.data.cachefile import is_uint8_bank, read_cache, write_cache

log = logging.getLogger(__name__)

ZIP_NAMES: tuple[str, ...] = ("images_background.zip", "images_evaluation.zip")
# md5 of the official zips (brendenlake/omniglot, also torchvision). Checked only for what we download:
# local zips may be rebuilt copies with other bytes, so those are checked by content instead.
# Module-level so tests can serve fake zips.
OFFICIAL_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
DEFAULT_SPLITS_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
SPLIT_NAMES: tuple[str, ...] = ("finn", "vinyals")
VINYALS_FILES: tuple[str, ...] = ("train.txt", "val.txt", "test.txt")

NUM_CHARACTERS = 1623
DRAWINGS_PER_CHARACTER = 20
NUM_ALPHABETS = 50
# Finn et al.: 1100 train + 100 val characters, the remaining 423 test.
FINN_SIZES = (1100, 100, 423)
# Bump when decoding or the cache layout changes, so old caches are rebuilt.
FORMAT_VERSION = 1

_CHUNK = 1 << 16
_ROT_RE = re.compile(r"^(?P<char>[^/]+/character\d+)/rot(?P<deg>\d{3})$")


# --------------------------------------------------------------------------------------------- download


class _DownloadFailed(Exception):
    """Network-side failure (refused, timeout, HTTP error, truncated body); callers turn it into a DataError."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # error messages stay on one line


def _fetch(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Stream url into a temp file next to dest, check length and md5, then os.replace into place.

    Any failure or interruption (also KeyboardInterrupt) removes the temp file, so dest is either
    absent/unchanged or complete.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent} ({e}); make it writable or put {dest.name} there by hand") from e
    tmp = Path(tmp_name)
    done = False
    try:
        digest = hashlib.md5()
        received = 0
        with os.fdopen(fd, "wb") as out:
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
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, leave=False) as bar:
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
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if md5 is not None and got != md5.lower():
            raise DataError(
                f"md5 mismatch for {dest.name} downloaded from {url}: expected {md5}, got {got}; nothing was saved, "
                f"check the URL or put the official {dest.name} at {dest} by hand"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, dest)
        done = True
    except OSError as e:  # network errors were turned into _DownloadFailed above: this is the local disk
        raise DataError(f"cannot write {dest} ({e}); free some space or make {dest.parent} writable") from e
    finally:
        if not done:  # also on KeyboardInterrupt: never leave a partial file behind
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


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


def _download_all(items: Sequence[tuple[str, Path, str | None]], what: str, timeout: float) -> None:
    """Download (url, dest, md5) items; on a network failure name every file still needed and where it goes."""
    for i, (url, dest, md5) in enumerate(items):
        try:
            _fetch(url, dest, md5, timeout)
        except _DownloadFailed as e:
            todo = "; ".join(f"{u} -> {d}" for u, d, _ in items[i:] if not d.exists())
            raise DataError(f"could not download {what} from {url} ({e}); put these files there by hand: {todo}") from e


def download_omniglot(root: str | os.PathLike[str], base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0) -> list[Path]:
    """Download the Omniglot zips missing from root, each checked against OFFICIAL_MD5.

    Returns the paths of both zips. Raises DataError (md5 mismatch, network failure) leaving no partial file.
    """
    root = Path(root).absolute()
    items = [(f"{base_url.rstrip('/')}/{n}", root / n, OFFICIAL_MD5[n]) for n in ZIP_NAMES if not (root / n).exists()]
    _download_all(items, "Omniglot", timeout)
    return [root / n for n in ZIP_NAMES]


# --------------------------------------------------------------------------------------------- zip safety


def _unsafe_member(name: str) -> bool:
    """True for zip entry names that could land outside the target folder (absolute, drive, or '..')."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return True
    return any(part == ".." for part in norm.split("/"))


def check_zip_members(zip_path: Path, names: Iterable[str]) -> None:
    for name in names:
        if _unsafe_member(name):
            raise DataError(
                f"{zip_path} has an entry {name!r} that points outside its folder; the zip is corrupt or malicious, "
                f"delete it and download it again"
            )


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable zip ({e}); delete it and download it again") from e


def safe_extract(zip_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract zip_path into dest, refusing (before writing anything) entries that would land outside dest.

    Returns the extracted file paths. Raises DataError for '../' or absolute entry names.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    root = dest.resolve()
    with open_zip(zip_path) as zf:
        infos = zf.infolist()
        check_zip_members(zip_path, (i.filename for i in infos))
        for info in infos:  # belt and braces: also catch anything resolve() maps outside (e.g. odd separators)
            target = (root / info.filename).resolve()
            if target != root and root not in target.parents:
                raise DataError(f"{zip_path} entry {info.filename!r} would land outside {root}; delete the zip and download it again")
        dest.mkdir(parents=True, exist_ok=True)
        return [Path(zf.extract(info, root)) for info in infos if not info.is_dir()]


# --------------------------------------------------------------------------------------------- decoding


def _scan(zip_paths: Sequence[Path]) -> tuple[list[str], list[list[tuple[int, str]]]]:
    """List characters and their drawings from the zips, in a fixed sorted order, checking the content.

    Returns (names "Alphabet/characterNN" sorted, per character the sorted (zip index, entry name) of its PNGs).
    """
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for zi, path in enumerate(zip_paths):
        with open_zip(path) as zf:
            names = zf.namelist()
        check_zip_members(path, names)
        for entry in names:
            parts = PurePosixPath(entry).parts
            # images_background/<Alphabet>/characterNN/IIII_DD.png; anything else (folders, stray files) is ignored
            if len(parts) == 4 and parts[3].lower().endswith(".png"):
                found[f"{parts[1]}/{parts[2]}"].append((zi, entry))
    names = sorted(found)
    alphabets = {n.split("/")[0] for n in names}
    bad = [n for n in names if len(found[n]) != DRAWINGS_PER_CHARACTER]
    if len(names) != NUM_CHARACTERS or len(alphabets) != NUM_ALPHABETS or bad:
        example = f" (e.g. {bad[0]} has {len(found[bad[0]])})" if bad else ""
        raise DataError(
            f"Omniglot zips {', '.join(str(p) for p in zip_paths)} hold {len(names)} characters in {len(alphabets)} alphabets, "
            f"{len(bad)} of them without {DRAWINGS_PER_CHARACTER} drawings{example}; expected {NUM_CHARACTERS} characters in "
            f"{NUM_ALPHABETS} alphabets with {DRAWINGS_PER_CHARACTER} drawings each: replace them with the original "
            f"images_background.zip and images_evaluation.zip"
        )
    return names, [sorted(found[n], key=lambda e: e[1]) for n in names]


def decode_drawing(data: bytes, image_size: int) -> np.ndarray:
    """An Omniglot PNG -> (S, S) uint8 with bright strokes on 0, as MAML's code does (1 - x).
    Lake's one-shot runs (fewshot.data.lake) go through this same function."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")  # from mode '1': Pillow would silently resize a '1' image with NEAREST, no antialiasing
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _decode_images(zip_paths: Sequence[Path], members: Sequence[Sequence[tuple[int, str]]], image_size: int) -> torch.Tensor:
    """Decode every listed PNG into a (characters, drawings, 1, S, S) uint8 tensor, strokes 255 on 0 (tqdm progress)."""
    count, per = len(members), len(members[0])
    out = np.empty((count, per, image_size, image_size), dtype=np.uint8)
    raw: dict[int, list[bytes]] = {}

    def work(ci: int) -> None:
        for di, data in enumerate(raw.pop(ci)):
            out[ci, di] = decode_drawing(data, image_size)

    zfs = [open_zip(p) for p in zip_paths]
    try:
        # Zip reads stay in this thread (a ZipFile shares one file handle); Pillow releases the GIL while resizing.
        # The pool closes first (joining its threads), so no progress callback runs after the bar is closed.
        with tqdm(total=count * per, desc=f"decoding Omniglot to {image_size}x{image_size}", unit="img", leave=False) as bar, ThreadPoolExecutor(
            max_workers=max(1, min(8, os.cpu_count() or 1))
        ) as pool:
            futures = []
            for ci, drawings in enumerate(members):
                raw[ci] = [zfs[zi].read(entry) for zi, entry in drawings]
                futures.append(pool.submit(work, ci))
                futures[-1].add_done_callback(lambda _f: bar.update(per))
            for f in futures:
                f.result()
    except (zipfile.BadZipFile, OSError, SyntaxError, ValueError, zlib.error) as e:  # corrupt zip entry or PNG
        raise DataError(f"cannot decode Omniglot from {', '.join(map(str, zip_paths))} ({e}); delete the zips and download them again") from e
    finally:
        for zf in zfs:
            zf.close()
    return torch.from_numpy(out).unsqueeze(2)


# --------------------------------------------------------------------------------------------- cache


def file_hash(path: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's content, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(zip_paths: Sequence[Path], image_size: int) -> str:
    """Hash of the source zips' content and of the preprocessing; names the cache file."""
    h = hashlib.sha1(f"omniglot|v{FORMAT_VERSION}|size={image_size}".encode())
    for p in zip_paths:
        h.update(f"|{p.name}:{p.stat().st_size}:{file_hash(p)}".encode())
    return h.hexdigest()[:16]


def omniglot_cache_file(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], image_size: int = 28) -> Path:
    """Path of the decoded cache for the zips in root at this image_size (it may not exist yet)."""
    root = Path(root)
    return Path(cache_dir) / f"omniglot_{_fingerprint([root / n for n in ZIP_NAMES], image_size)}.pt"


def _read_cache(path: Path, fingerprint: str, image_size: int) -> tuple[torch.Tensor, list[str]] | None:
    """The cached (images, names), or None when missing, unreadable or not for this fingerprint (then rebuilt)."""
    data = read_cache(path, fingerprint, FORMAT_VERSION, "Omniglot", lambda d: (
        is_uint8_bank(d["images"], (NUM_CHARACTERS, DRAWINGS_PER_CHARACTER, 1, image_size, image_size))
        and len(d["names"]) == NUM_CHARACTERS))
    return None if data is None else (data["images"], list(data["names"]))


def load_omniglot_images(
    root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], image_size: int = 28
) -> tuple[torch.Tensor, list[str]]:
    """All characters as ((1623, 20, 1, S, S) uint8, sorted names "Alphabet/characterNN"), decoded once and cached.

    The zips must already be in root. The cache file is keyed by the zips' content and the preprocessing.
    """
    root = Path(root)
    zip_paths = [root / n for n in ZIP_NAMES]
    fingerprint = _fingerprint(zip_paths, image_size)
    path = Path(cache_dir) / f"omniglot_{fingerprint}.pt"
    cached = _read_cache(path, fingerprint, image_size)
    if cached is not None:
        log.debug("Omniglot loaded from cache %s", path)
        return cached
    start = time.perf_counter()
    names, members = _scan(zip_paths)
    images = _decode_images(zip_paths, members, image_size)
    write_cache(
        path,
        {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "image_size": image_size, "names": names, "images": images},
        "Omniglot",
    )
    log.info("decoded Omniglot (%d images) in %.1fs into %s", images.shape[0] * images.shape[1], time.perf_counter() - start, path)
    return images, names


# --------------------------------------------------------------------------------------------- splits


def _finn_splits(images: torch.Tensor, names: list[str], seed: int) -> dict[str, SplitBank]:
    order = sorted(names)
    random.Random(seed).shuffle(order)
    index = {n: i for i, n in enumerate(names)}
    splits, start = {}, 0
    for split, size in zip(("train", "val", "test"), FINN_SIZES):
        chosen = order[start : start + size]
        start += size
        idx = torch.tensor([index[n] for n in chosen], dtype=torch.long)
        splits[split] = SplitBank(images=images[idx], class_names=chosen, rotate=True)
    return splits


def _ensure_vinyals_files(root: Path, splits_url: str, download: bool, timeout: float) -> Path:
    folder = root / "splits" / "vinyals"
    missing = [n for n in VINYALS_FILES if not (folder / n).exists()]
    if missing and not download:
        raise DataError(
            f"Vinyals split files missing: put {', '.join(str(folder / n) for n in missing)} there "
            f"(from {splits_url.rstrip('/')}/<name>) or set download=true"
        )
    _download_all([(f"{splits_url.rstrip('/')}/{n}", folder / n, None) for n in missing], "the Vinyals split", timeout)
    return folder


def _vinyals_splits(images: torch.Tensor, names: list[str], folder: Path) -> dict[str, SplitBank]:
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, file in zip(("train", "val", "test"), VINYALS_FILES):
        path = folder / file
        classes, chars, ks = [], [], []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            m = _ROT_RE.match(line)
            if m is None or int(m["deg"]) % 90 or int(m["deg"]) >= 360:
                raise DataError(f"{path}:{lineno}: {line!r} is not of the form Alphabet/characterNN/rotDDD (DDD in 000/090/180/270)")
            if m["char"] not in index:
                raise DataError(f"{path}:{lineno}: unknown Omniglot character {m['char']!r}; fix the split file or the zips in {folder.parent.parent}")
            classes.append(line)
            chars.append(index[m["char"]])
            ks.append(int(m["deg"]) // 90)
        if not classes:
            raise DataError(f"{path} lists no classes; restore the Vinyals split file")
        bank = images[torch.tensor(chars, dtype=torch.long)]
        k_t = torch.tensor(ks)
        for k in (1, 2, 3):  # counter-clockwise, like PIL's rotate in the ProtoNets code
            sel = (k_t == k).nonzero().squeeze(1)
            if len(sel):
                bank[sel] = torch.rot90(bank[sel], k, dims=(-2, -1))
        splits[split] = SplitBank(images=bank, class_names=classes, rotate=False)
    return splits


def load_omniglot(
    root: str,
    cache_dir: str,
    image_size: int = 28,
    split: str = "finn",
    split_seed: int = 1,
    download: bool = True,
    base_url: str = DEFAULT_BASE_URL,
    splits_url: str = DEFAULT_SPLITS_URL,
) -> FewShotDataset:
    """Omniglot as a FewShotDataset with train/val/test SplitBanks of uint8 (classes, 20, 1, S, S) images.

    root: folder with images_background.zip and images_evaluation.zip (may be read-only when both exist);
        missing zips are downloaded there when download is true (md5 checked against OFFICIAL_MD5).
    cache_dir: writable folder for the decoded cache (one file per zip content and image_size).
    image_size: S; drawings are resized from 105x105 with Lanczos and inverted (strokes 255, background 0).
    split: "finn" (1623 sorted characters shuffled with split_seed: 1100/100/423, a random rotation per class
        per task drawn by the sampler) or "vinyals" (root/splits/vinyals/*.txt, each character rotation its own
        class: 4112/688/1692 classes, no further rotation).
    """
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    if image_size < 1:
        raise DataError(f"Omniglot image_size must be positive, got {image_size}")
    root_p = Path(root).expanduser().absolute()
    timeout = 60.0
    missing = [n for n in ZIP_NAMES if not (root_p / n).exists()]
    if missing:
        if not download:
            urls = ", ".join(f"{base_url.rstrip('/')}/{n}" for n in missing)
            raise DataError(
                f"Omniglot not found: put {', '.join(str(root_p / n) for n in missing)} there (from {urls}) or set download=true"
            )
        download_omniglot(root_p, base_url, timeout)
    vinyals_folder = _ensure_vinyals_files(root_p, splits_url, download, timeout) if split == "vinyals" else None
    images, names = load_omniglot_images(root_p, Path(cache_dir).expanduser(), image_size)
    if split == "finn":
        splits = _finn_splits(images, names, split_seed)
    else:
        assert vinyals_folder is not None
        splits = _vinyals_splits(images, names, vinyals_folder)
    return FewShotDataset(name="omniglot", splits=splits, channels=1, image_size=image_size, mean=(0.0,), std=(1.0,))
