"""Omniglot (Lake et al., 2015): its zips' layout, its drawings' decoding, and its splits (Finn, Vinyals, Koch's).

The two zips are read in place (no extraction). All 32,460 drawings are decoded once into a single
uint8 tensor cached in ``cache_dir``; later loads only hash the zips and read that file. Downloading,
zip safety and the cache itself are fewshot.data.io's.
"""

from __future__ import annotations

import io
import os
import random
import re
import threading
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fewshot.data.base import DataError, SplitBank
from fewshot.data.dataset import FewShotDataset, task_source
from fewshot.data.io.archives import check_zip_members, open_zip
from fewshot.data.io.cache import cached, is_uint8_bank
from fewshot.data.io.decode import fill_parallel
from fewshot.data.io.download import download_all
from fewshot.data.io.hashing import fingerprint

ZIP_NAMES: tuple[str, ...] = ("images_background.zip", "images_evaluation.zip")
# md5 of the official zips (brendenlake/omniglot, also torchvision). Checked only for what we download:
# local zips may be rebuilt copies with other bytes, so those are checked by content instead.
# Module-level so tests can serve fake zips.
OFFICIAL_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
DEFAULT_SPLITS_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
)
SPLIT_NAMES: tuple[str, ...] = ("finn", "vinyals", "vinyals_trainval", "background")
VINYALS_FILES: tuple[str, ...] = ("train.txt", "val.txt", "test.txt")
# vinyals_trainval trains on trainval.txt (the train and val characters, 1200: the papers' training set) instead.
VINYALS_TRAINVAL_FILES: tuple[str, ...] = ("trainval.txt", "val.txt", "test.txt")

NUM_CHARACTERS = 1623
DRAWINGS_PER_CHARACTER = 20
NUM_ALPHABETS = 50
# Finn et al.: 1100 train + 100 val characters, the remaining 423 test.
FINN_SIZES = (1100, 100, 423)
# Bump when decoding or the cache layout changes, so old caches are rebuilt.
FORMAT_VERSION = 1

_ROT_RE = re.compile(r"^(?P<char>[^/]+/character\d+)/rot(?P<deg>\d{3})$")


# --------------------------------------------------------------------------------------------- download


def download_omniglot(
    root: str | os.PathLike[str], base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0
) -> list[Path]:
    """Download the Omniglot zips missing from root, each checked against OFFICIAL_MD5.

    Returns the paths of both zips. Raises DataError (md5 mismatch, network failure) leaving no partial file.
    """
    root = Path(root).absolute()
    items = [(f"{base_url.rstrip('/')}/{n}", root / n, OFFICIAL_MD5[n]) for n in ZIP_NAMES if not (root / n).exists()]
    download_all(items, "Omniglot", timeout)
    return [root / n for n in ZIP_NAMES]


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
            f"Omniglot zips {', '.join(str(p) for p in zip_paths)} hold {len(names)} characters in "
            f"{len(alphabets)} alphabets, {len(bad)} of them without {DRAWINGS_PER_CHARACTER} drawings{example}; "
            f"expected {NUM_CHARACTERS} characters in {NUM_ALPHABETS} alphabets with {DRAWINGS_PER_CHARACTER} "
            "drawings each: replace them with the original images_background.zip and images_evaluation.zip"
        )
    return names, [sorted(found[n], key=lambda e: e[1]) for n in names]


def decode_drawing(data: bytes, image_size: int) -> np.ndarray:
    """An Omniglot PNG -> (S, S) uint8 with bright strokes on 0, as MAML's code does (1 - x).
    Lake's one-shot runs (fewshot.benchmarks.lake) go through this same function."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")  # from mode '1': Pillow would silently resize a '1' image with NEAREST, no antialiasing
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _decode_images(
    zip_paths: Sequence[Path], members: Sequence[Sequence[tuple[int, str]]], image_size: int
) -> torch.Tensor:
    """Decode every listed PNG into a (characters, drawings, 1, S, S) uint8 tensor, strokes 255 on 0 (tqdm progress)."""
    count, per = len(members), len(members[0])
    out = np.empty((count * per, image_size, image_size), dtype=np.uint8)
    entries = [e for drawings in members for e in drawings]
    lock = threading.Lock()

    def work(i: int) -> None:
        zi, entry = entries[i]
        with lock:  # a ZipFile shares one file handle: one read at a time; Pillow decodes without the GIL
            data = zfs[zi].read(entry)
        out[i] = decode_drawing(data, image_size)

    zfs = [open_zip(p) for p in zip_paths]
    try:
        fill_parallel(count * per, work, f"decoding Omniglot to {image_size}x{image_size}")
    except (zipfile.BadZipFile, OSError, SyntaxError, ValueError, zlib.error) as e:  # corrupt zip entry or PNG
        raise DataError(
            f"cannot decode Omniglot from {', '.join(map(str, zip_paths))} "
            f"({e}); delete the zips and download them again"
        ) from e
    finally:
        for zf in zfs:
            zf.close()
    return torch.from_numpy(out.reshape(count, per, image_size, image_size)).unsqueeze(2)


# --------------------------------------------------------------------------------------------- cache


def _fingerprint(zip_paths: Sequence[Path], image_size: int) -> str:
    """Hash of the source zips' content and of the preprocessing; names the cache file."""
    return fingerprint("omniglot", FORMAT_VERSION, {"image_size": image_size}, zip_paths)


def omniglot_cache_file(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], image_size: int = 28) -> Path:
    """Path of the decoded cache for the zips in root at this image_size (it may not exist yet)."""
    root = Path(root)
    return Path(cache_dir) / f"omniglot_{_fingerprint([root / n for n in ZIP_NAMES], image_size)}.pt"


def load_omniglot_images(
    root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], image_size: int = 28
) -> tuple[torch.Tensor, list[str]]:
    """All characters as ((1623, 20, 1, S, S) uint8, sorted names "Alphabet/characterNN"), decoded once and cached.

    The zips must already be in root. The cache file is keyed by the zips' content and the preprocessing.
    """
    zip_paths = [Path(root) / n for n in ZIP_NAMES]
    fp = _fingerprint(zip_paths, image_size)
    shape = (NUM_CHARACTERS, DRAWINGS_PER_CHARACTER, 1, image_size, image_size)

    def decode() -> dict:
        names, members = _scan(zip_paths)
        return {"image_size": image_size, "names": names, "images": _decode_images(zip_paths, members, image_size)}

    data = cached(
        Path(cache_dir) / f"omniglot_{fp}.pt",
        fp,
        FORMAT_VERSION,
        "Omniglot",
        valid=lambda d: is_uint8_bank(d["images"], shape) and len(d["names"]) == NUM_CHARACTERS,
        decode=decode,
        describe=lambda d: f"{d['images'].shape[0] * d['images'].shape[1]} images",
    )
    return data["images"], list(data["names"])


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


def _background_splits(images: torch.Tensor, names: list[str], background: set[str]) -> dict[str, SplitBank]:
    """Koch et al.'s protocol: train on the 30 alphabets of images_background (964 characters), validate on 10 of
    the 20 alphabets of images_evaluation (the first 10 in sorted order) and test on the other 10; no rotations."""
    evaluation = sorted({n.split("/")[0] for n in names} - background)
    groups = {"train": background, "val": set(evaluation[:10]), "test": set(evaluation[10:])}
    splits = {}
    for split, alphabets in groups.items():
        chosen = [i for i, n in enumerate(names) if n.split("/")[0] in alphabets]
        idx = torch.tensor(chosen, dtype=torch.long)
        splits[split] = SplitBank(images=images[idx], class_names=[names[i] for i in chosen], rotate=False)
    return splits


def _alphabets(zip_path: Path) -> set[str]:
    with open_zip(zip_path) as zf:
        return {PurePosixPath(e).parts[1] for e in zf.namelist() if len(PurePosixPath(e).parts) == 4}


def _ensure_vinyals_files(
    root: Path, splits_url: str, download: bool, timeout: float, files: tuple[str, ...] = VINYALS_FILES
) -> Path:
    folder = root / "splits" / "vinyals"
    missing = [n for n in files if not (folder / n).exists()]
    if missing and not download:
        raise DataError(
            f"Vinyals split files missing: put {', '.join(str(folder / n) for n in missing)} "
            f"there (from {splits_url.rstrip('/')}/<name>) or set download=true"
        )
    download_all([(f"{splits_url.rstrip('/')}/{n}", folder / n, None) for n in missing], "the Vinyals split", timeout)
    return folder


def _vinyals_splits(
    images: torch.Tensor, names: list[str], folder: Path, files: tuple[str, ...] = VINYALS_FILES
) -> dict[str, SplitBank]:
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, file in zip(("train", "val", "test"), files):
        path = folder / file
        classes, chars, ks = [], [], []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            m = _ROT_RE.match(line)
            if m is None or int(m["deg"]) % 90 or int(m["deg"]) >= 360:
                raise DataError(
                    f"{path}:{lineno}: {line!r} is not of the form Alphabet/characterNN/rotDDD (DDD in 000/090/180/270)"
                )
            if m["char"] not in index:
                raise DataError(
                    f"{path}:{lineno}: unknown Omniglot character {m['char']!r}; "
                    f"fix the split file or the zips in {folder.parent.parent}"
                )
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


@task_source
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
        per task drawn by the sampler), "vinyals" (root/splits/vinyals/*.txt, each character rotation its own
        class: 4112/688/1692 classes, no further rotation), "vinyals_trainval" (the same, training on
        trainval.txt's 4800 classes, the 1200 characters the papers train on: validation's classes are then
        among the training ones, so its curve is not a held-out measure; test the final weights) or
        "background" (Koch et al.: the 30 background alphabets' 964 characters for training, 10 evaluation
        alphabets for validation and the other 10 for test, no rotation; Lake's one-shot runs come from the
        evaluation alphabets only).
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
                f"Omniglot not found: put {', '.join(str(root_p / n) for n in missing)} "
                f"there (from {urls}) or set download=true"
            )
        download_omniglot(root_p, base_url, timeout)
    files = VINYALS_TRAINVAL_FILES if split == "vinyals_trainval" else VINYALS_FILES
    vinyals = split.startswith("vinyals")
    vinyals_folder = _ensure_vinyals_files(root_p, splits_url, download, timeout, files) if vinyals else None
    images, names = load_omniglot_images(root_p, Path(cache_dir).expanduser(), image_size)
    if split == "finn":
        splits = _finn_splits(images, names, split_seed)
    elif split == "background":
        splits = _background_splits(images, names, _alphabets(root_p / ZIP_NAMES[0]))
    else:
        assert vinyals_folder is not None
        splits = _vinyals_splits(images, names, vinyals_folder, files)
    return FewShotDataset(name="omniglot", splits=splits, channels=1, image_size=image_size, mean=(0.0,), std=(1.0,))
