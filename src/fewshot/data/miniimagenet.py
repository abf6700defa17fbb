"""miniImageNet (Vinyals et al., 2016) on the Ravi & Larochelle (2017) split: 64/16/20 classes x 600 images, 84x84.

Two on-disk formats are read:

- ``format="pickle"``: ``mini-imagenet-cache-{train,validation,test}.pkl`` in root, each a dict with
  ``image_data`` (N x 84 x 84 x 3 uint8) and ``class_dict`` (wnid -> list of row indices). They are read with a
  restricted unpickler that only rebuilds numpy arrays, lists and dicts (a pickle may name any code to run).
- ``format="csv"``: the Ravi split files ``{train,val,test}.csv`` (header ``filename,label``) and the images in
  ``root/images/<filename>``, decoded and resized to image_size with Lanczos (antialiased) once.

Either way the decoded banks are cached in ``cache_dir`` under a fingerprint of the sources and the preprocessing.
The Ravi CSVs are looked for in ``root/splits/ravi/``, then next to the images (``root/``), then in ``split_dir``;
when found, every split's class list must equal theirs (with format=csv, also those in split_dir when that is
another folder). Reading and checking those CSVs is fewshot.data.ravi's.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fewshot.data.base import DataError
from fewshot.data.dataset import (
    SPLITS,
    FewShotDataset,
    banks_from_payload,
    check_image_size,
    check_normalization,
    splits_payload_valid,
    task_source,
)
from fewshot.data.io.cache import cached
from fewshot.data.io.decode import corrupt, decode_image, fill_parallel, resize_banks, to_bank
from fewshot.data.io.download import ensure_files
from fewshot.data.io.hashing import fingerprint
from fewshot.data.io.pickles import as_text, get_key, restricted_load
from fewshot.data.ravi import (
    CSV_NAMES,
    check_classes,
    find_split_dir,
    group_by_class,
    read_split_csv,
    split_classes,
    split_dir_candidates,
)

log = logging.getLogger(__name__)

PICKLE_NAMES: dict[str, str] = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
FORMATS: tuple[str, ...] = ("pickle", "csv")
IMAGES_DIR = "images"
# Bump when decoding or the cache layout changes, so old caches are rebuilt.
FORMAT_VERSION = 1
WHAT = "miniImageNet"


# --------------------------------------------------------------------------------------------- decoding


def _decode_pickles(root: Path, image_size: int, images_per_class: int) -> dict[str, dict]:
    """Each split's pickle -> {'images': (classes, per_class, 3, S, S) uint8, 'class_names': sorted wnids}."""
    out = {}
    for split in SPLITS:
        path = root / PICKLE_NAMES[split]
        data = restricted_load(path, WHAT)
        image_data = get_key(data, "image_data", path, WHAT)
        class_dict = get_key(data, "class_dict", path, WHAT)
        is_array = isinstance(image_data, np.ndarray)
        if not (is_array and image_data.dtype == np.uint8 and image_data.ndim == 4 and image_data.shape[3] == 3):
            desc = f"{image_data.dtype} {image_data.shape}" if is_array else type(image_data).__name__
            raise DataError(f"{path}: image_data is {desc}, expected N x H x W x 3 uint8; replace it with the original")
        if not isinstance(class_dict, dict) or not class_dict:
            raise DataError(
                f"{path}: class_dict is not a non-empty dict of wnid -> image indices; replace it with the original"
            )
        names = sorted(as_text(k) for k in class_dict)
        by_name = {as_text(k): v for k, v in class_dict.items()}
        order = []
        for name in names:
            try:
                idx = np.asarray(by_name[name], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: class_dict[{name!r}] is not a list of image indices ({e})") from e
            if len(idx) != images_per_class:
                raise DataError(
                    f"{path}: class {name} has {len(idx)} images, expected images_per_class={images_per_class}; "
                    "replace the file with the original (600 per class) or set images_per_class"
                )
            if idx.size and (idx.min() < 0 or idx.max() >= len(image_data)):
                raise DataError(f"{path}: class {name} points at images outside image_data (0..{len(image_data) - 1})")
            order.append(idx)
        flat = np.concatenate(order)
        if len(np.unique(flat)) != len(flat):
            raise DataError(f"{path}: class_dict puts an image in two classes; replace the file with the original")
        images = resize_banks(image_data[flat], image_size, f"resizing {WHAT} {split} to {image_size}x{image_size}")
        out[split] = {"images": to_bank(images, len(names), images_per_class), "class_names": names}
    return out


def _csv_sources(root: Path, csv_dir: Path, images_per_class: int) -> dict[str, "OrderedDict[str, list[str]]"]:
    """Per split, wnid -> its image filenames from the CSVs, each class with exactly images_per_class rows."""
    out = {}
    for split in SPLITS:
        path = csv_dir / CSV_NAMES[split]
        by_class = group_by_class(read_split_csv(path))
        for label, files in by_class.items():
            if len(files) != images_per_class:
                raise DataError(
                    f"{path}: class {label} has {len(files)} images, expected images_per_class={images_per_class}; "
                    "restore the Ravi CSV (600 per class) or set images_per_class"
                )
        out[split] = by_class
    return out


def _image_stats(images_dir: Path, sources: dict[str, "OrderedDict[str, list[str]]"]) -> list[str]:
    """name:size:mtime of every listed image (for the fingerprint); DataError naming the missing ones."""
    stats, missing, total = [], [], 0
    for split in SPLITS:
        for files in sources[split].values():
            for name in files:
                total += 1
                try:
                    st = os.stat(images_dir / name)
                except OSError:
                    missing.append(name)
                    continue
                stats.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    if missing:
        raise DataError(
            f"{len(missing)} of the {total} images listed in the split CSVs are missing from "
            f"{images_dir} (e.g. {images_dir / missing[0]}); put the miniImageNet images there"
        )
    return stats


def _decode_csv(
    images_dir: Path, sources: dict[str, "OrderedDict[str, list[str]]"], image_size: int, images_per_class: int
) -> dict[str, dict]:
    """Decode every listed image into (classes, per_class, 3, S, S) uint8 banks, resized with Lanczos."""
    out = {}
    for split in SPLITS:
        names = list(sources[split])
        files = [f for n in names for f in sources[split][n]]
        arr = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)

        def work(i: int, files=files, arr=arr) -> None:
            path = images_dir / files[i]
            try:
                arr[i] = decode_image(path.read_bytes(), image_size)
            except (OSError, SyntaxError, ValueError) as e:
                raise corrupt(path, WHAT, e) from e

        fill_parallel(len(files), work, f"decoding {WHAT} {split} to {image_size}x{image_size}")
        out[split] = {"images": to_bank(arr, len(names), images_per_class), "class_names": names}
    return out


# --------------------------------------------------------------------------------------------- loader


@task_source
def load_miniimagenet(
    root: str,
    cache_dir: str,
    format: str = "pickle",
    split_dir: Optional[str] = None,
    image_size: int = 84,
    images_per_class: int = 600,
    url: Optional[str] = None,
    md5: Optional[str] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> FewShotDataset:
    """miniImageNet as a FewShotDataset: train/val/test banks of uint8 (64|16|20, images_per_class, 3, S, S).

    root: folder with the three pickles (format="pickle") or with images/ (format="csv").
    cache_dir: writable folder for the decoded cache.
    split_dir: a folder with the Ravi {train,val,test}.csv, looked in after root/splits/ravi and root.
    image_size: S (84 in the papers); other sizes are resized with Lanczos.
    images_per_class: the exact count every class must have (600; smaller for a miniature).
    url, md5: an archive (or single file) to download into root when files are missing; None: local files only.
    mean, std: per-channel normalization after scaling to [0, 1], stored in the dataset for the sampler.
    """
    if format not in FORMATS:
        raise DataError(f"unknown {WHAT} format {format!r}; choose one of {', '.join(FORMATS)}")
    check_image_size(image_size, WHAT)
    if images_per_class < 1:
        raise DataError(f"{WHAT} images_per_class must be positive, got {images_per_class}")
    mean_t, std_t = check_normalization(mean, std, 3, WHAT)
    root_p = Path(root).expanduser().absolute()
    split_p = Path(split_dir).expanduser().absolute() if split_dir else None
    cache_p = Path(cache_dir).expanduser()
    candidates = " or ".join(str(d) for d in split_dir_candidates(root_p, split_p))
    params = {"image_size": image_size, "images_per_class": images_per_class}

    if format == "pickle":
        sources = [root_p / PICKLE_NAMES[s] for s in SPLITS]
        hint = f" (or set format=csv with the images in {root_p / IMAGES_DIR})"
        ensure_files(sources, root_p, url, md5, WHAT, hint=hint)
        fp = fingerprint("miniimagenet-pickle", FORMAT_VERSION, params, sources)
        decode = lambda: _decode_pickles(root_p, image_size, images_per_class)  # noqa: E731
        source_desc = str(root_p)
    else:
        images_dir = root_p / IMAGES_DIR
        csv_dir = find_split_dir(root_p, split_p)
        required = [images_dir] + ([] if csv_dir else [root_p / "splits" / "ravi" / CSV_NAMES[s] for s in SPLITS])
        hint = f" ({images_dir} holds the images the CSVs name; the Ravi CSVs may also sit in {candidates})"
        ensure_files(required, root_p, url, md5, WHAT, hint=hint)
        csv_dir = csv_dir or find_split_dir(root_p, split_p)
        if csv_dir is None:
            raise DataError(
                f"{WHAT} split files {', '.join(CSV_NAMES.values())} not found in {candidates}; put the Ravi CSVs there"
            )
        srcs = _csv_sources(root_p, csv_dir, images_per_class)
        stats = _image_stats(images_dir, srcs)
        csv_files = [csv_dir / CSV_NAMES[s] for s in SPLITS]
        fp = fingerprint("miniimagenet-csv", FORMAT_VERSION, params, csv_files, stats)
        decode = lambda: _decode_csv(images_dir, srcs, image_size, images_per_class)  # noqa: E731
        source_desc = f"{csv_dir} with {images_dir}"

    def decode_checked() -> dict:
        splits = decode()
        check_classes({s: splits[s]["class_names"] for s in SPLITS}, source_desc, None, None)
        return {"image_size": image_size, "splits": splits}

    def describe(payload: dict) -> str:
        n = sum(int(e["images"].shape[0] * e["images"].shape[1]) for e in payload["splits"].values())
        return f"{n} images, {format}"

    path = cache_p / f"miniimagenet_{format}_{fp}.pt"
    payload = cached(
        path, fp, FORMAT_VERSION, WHAT, splits_payload_valid(3, image_size), decode_checked, describe, mmap=True
    )

    # The class lists are checked against the split files on every load (the cache does not depend on them).
    classes = {s: list(payload["splits"][s]["class_names"]) for s in SPLITS}
    ref_dir = find_split_dir(root_p, split_p) if format == "pickle" else split_p
    if format == "csv" and (
        ref_dir is None
        or not all((ref_dir / n).is_file() for n in CSV_NAMES.values())
        or ref_dir.resolve() == csv_dir.resolve()
    ):
        ref_dir = None  # the CSVs used are the split files
    if format == "pickle" and ref_dir is None:
        log.warning("%s class lists not checked: no Ravi split CSVs in %s", WHAT, candidates)
    check_classes(classes, source_desc, split_classes(ref_dir) if ref_dir else None, ref_dir)
    return FewShotDataset(
        name="miniimagenet",
        splits=banks_from_payload(payload),
        channels=3,
        image_size=image_size,
        mean=mean_t,
        std=std_t,
    )
