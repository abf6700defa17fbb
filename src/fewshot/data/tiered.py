"""tieredImageNet (Ren et al., 2018): 608 ImageNet classes in 34 superclasses, 351/97/160 classes
(20/6/8 superclasses) for train/val/test, 84x84.

Read from its common release (renmengye/few-shot-ssl-public) in root:

- ``format="pickle"``: ``{split}_images_png.pkl``, a list of PNG-encoded images (numpy uint8 buffers or byte
  strings), with ``{split}_labels.pkl``, a dict with ``label_specific`` (class index of each image),
  ``label_general`` (superclass index), ``label_specific_str`` (class wnids) and ``label_general_str``;
- ``format="npz"``: ``{split}_images.npz`` (key ``images``, N x 84 x 84 x 3 uint8) with the same labels file.
  npz files written by that repo's ``decompress`` (cv2.imdecode) hold BGR pixels: npz_channel_order="bgr"
  flips them to RGB; the default "rgb" keeps the pixels as stored (what most published code fed its nets).

Every pickle goes through a restricted unpickler (numpy arrays, lists, dicts only). A labels file of the
``{'labels': [...]}`` form (MetaOptNet's repackaging) is read too; its classes are named by their index.

Classes have 732 to 1300 images, but a bank holds the same count for every class: each split keeps the
first m images (file order) of every class, m = the smallest class of that split, and logs m and what was
dropped on every load. The decoded banks are cached in cache_dir under a fingerprint of the files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

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
from fewshot.data.io.npz import npz_array
from fewshot.data.io.pickles import as_text, get_key, restricted_load

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("pickle", "npz")
CHANNEL_ORDERS: tuple[str, ...] = ("rgb", "bgr")
TIERED_CLASSES: tuple[int, int, int] = (351, 97, 160)
# Bump when decoding or the cache layout changes, so old caches are rebuilt.
FORMAT_VERSION = 1
WHAT = "tieredImageNet"


def image_file(split: str, format: str) -> str:
    return f"{split}_images_png.pkl" if format == "pickle" else f"{split}_images.npz"


def labels_file(split: str) -> str:
    return f"{split}_labels.pkl"


# --------------------------------------------------------------------------------------------- reading


def _read_labels(path: Path) -> tuple[np.ndarray, list[str], Optional[np.ndarray], Optional[list[str]]]:
    """(class index per image, class names, superclass index per image or None, superclass names or None)."""
    d = restricted_load(path, WHAT)
    if not isinstance(d, dict):
        raise DataError(
            f"{path} holds a {type(d).__name__}, not the dict of a {WHAT} labels file; replace it with the original"
        )
    keys = {as_text(k): k for k in d}
    if "label_specific" in keys:
        specific = np.asarray(d[keys["label_specific"]], dtype=np.int64).reshape(-1)
        names = [as_text(n) for n in get_key(d, "label_specific_str", path, WHAT)]
        general = np.asarray(d[keys["label_general"]], dtype=np.int64).reshape(-1) if "label_general" in keys else None
        general_names = [as_text(n) for n in d[keys["label_general_str"]]] if "label_general_str" in keys else None
    elif "labels" in keys:  # MetaOptNet's repackaging: {'labels': [...], maybe 'catname2label': {...}}
        specific = np.asarray(d[keys["labels"]], dtype=np.int64).reshape(-1)
        top = int(specific.max()) + 1 if len(specific) else 0
        names = [str(i) for i in range(top)]
        if "catname2label" in keys and isinstance(d[keys["catname2label"]], dict):
            for name, label in d[keys["catname2label"]].items():
                if 0 <= int(label) < top:
                    names[int(label)] = as_text(name)
        general, general_names = None, None
    else:
        raise DataError(
            f"{path} has neither 'label_specific' nor 'labels' (it has "
            f"{', '.join(sorted(keys))}); replace it with the original"
        )
    if len(specific) and (specific.min() < 0 or specific.max() >= len(names)):
        raise DataError(f"{path}: class indices outside 0..{len(names) - 1}; replace it with the original")
    if general is not None and len(general) != len(specific):
        raise DataError(
            f"{path}: {len(general)} superclass labels for {len(specific)} images; replace it with the original"
        )
    return specific, names, general, general_names


def _png_bytes(item: Any, path: Path, i: int) -> bytes:
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):  # a Python 2 str, decoded as latin-1 by the unpickler
        return item.encode("latin1")
    raise DataError(
        f"{path}: item {i} is a {type(item).__name__}, not an encoded image; replace the file with the original"
    )


def _kept_indices(
    specific: np.ndarray, names: Sequence[str], path: Path, split: str
) -> tuple[list[int], np.ndarray, dict[str, int]]:
    """Classes present (sorted index), the first m image indices of each (class-major), and the count stats."""
    classes = sorted(set(specific.tolist()))
    if not classes:
        raise DataError(f"{path}: the {split} split has no images; replace it with the original")
    counts = np.bincount(specific, minlength=len(names))[classes]
    m = int(counts.min())
    order = np.argsort(specific, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(specific, minlength=len(names)))])
    kept = np.concatenate([order[starts[c] : starts[c] + m] for c in classes])
    return classes, kept, {"kept": m, "max": int(counts.max()), "dropped": int(counts.sum()) - m * len(classes)}


def _decode_split(
    root: Path, split: str, format: str, image_size: int, channel_order: str, expected: Optional[int] = None
) -> dict[str, Any]:
    lpath = root / labels_file(split)
    ipath = root / image_file(split, format)
    specific, names, general, general_names = _read_labels(lpath)
    classes, kept, stats = _kept_indices(specific, names, lpath, split)
    if expected is not None and len(classes) != expected:  # before decoding thousands of images
        raise _count_error(root, split, len(classes), expected)
    m = stats["kept"]
    superclasses: list[str] = []
    if general is not None:
        for c in classes:
            parents = np.unique(general[specific == c])
            if len(parents) != 1:
                raise DataError(f"{lpath}: class {names[c]} has superclass labels {parents.tolist()}, expected one")
            p = int(parents[0])
            named = general_names is not None and 0 <= p < len(general_names)
            superclasses.append(general_names[p] if named else str(p))

    if format == "pickle":
        items = restricted_load(ipath, WHAT)
        if not isinstance(items, (list, tuple)):
            raise DataError(
                f"{ipath} holds a {type(items).__name__}, not a list of PNG images; replace it with the original"
            )
        if len(items) != len(specific):
            raise DataError(
                f"{ipath} has {len(items)} images but {lpath} labels "
                f"{len(specific)}; the two files do not belong together"
            )
        arr = np.empty((len(kept), image_size, image_size, 3), dtype=np.uint8)

        def work(i: int) -> None:
            j = int(kept[i])
            try:
                arr[i] = decode_image(_png_bytes(items[j], ipath, j), image_size)
            except (OSError, SyntaxError, ValueError) as e:
                raise corrupt(ipath, f"{WHAT} image {j}", e) from e

        fill_parallel(len(kept), work, f"decoding {WHAT} {split} to {image_size}x{image_size}")
    else:
        images = npz_array(ipath, "images", WHAT)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(
                f"{ipath}: images is {images.dtype} {images.shape}, "
                "expected N x H x W x 3 uint8; replace it with the original"
            )
        if len(images) != len(specific):
            raise DataError(
                f"{ipath} has {len(images)} images but {lpath} labels "
                f"{len(specific)}; the two files do not belong together"
            )
        arr = np.asarray(images[np.sort(kept)])[np.argsort(np.argsort(kept))]  # read rows in file order, then regroup
        if channel_order == "bgr":
            arr = np.ascontiguousarray(arr[..., ::-1])
        arr = resize_banks(arr, image_size, f"resizing {WHAT} {split} to {image_size}x{image_size}")
    return {
        "images": to_bank(arr, len(classes), m),
        "class_names": [names[c] for c in classes],
        "superclasses": superclasses,
        "counts": stats,
    }


# --------------------------------------------------------------------------------------------- loader


@task_source
def load_tieredimagenet(
    root: str,
    cache_dir: str,
    format: str = "pickle",
    image_size: int = 84,
    classes_per_split: Optional[Sequence[int]] = TIERED_CLASSES,
    npz_channel_order: str = "rgb",
    url: Optional[str] = None,
    md5: Optional[str] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> FewShotDataset:
    """tieredImageNet as a FewShotDataset: banks of uint8 (classes, m, 3, S, S), m the smallest class of each split.

    root: folder with {train,val,test}_labels.pkl and {split}_images_png.pkl (format="pickle") or
        {split}_images.npz (format="npz").
    classes_per_split: expected class counts for train/val/test (351, 97, 160); None skips the check.
    npz_channel_order: "rgb" keeps npz pixels as stored, "bgr" flips them (npz written with cv2).
    url, md5: an archive to download into root when files are missing; None: local files only.
    """
    if format not in FORMATS:
        raise DataError(f"unknown {WHAT} format {format!r}; choose one of {', '.join(FORMATS)}")
    if npz_channel_order not in CHANNEL_ORDERS:
        raise DataError(f"unknown npz_channel_order {npz_channel_order!r}; choose one of {', '.join(CHANNEL_ORDERS)}")
    if classes_per_split is not None and len(classes_per_split) != 3:
        raise DataError(
            f"classes_per_split must list 3 counts (train, val, test) or be null, got {list(classes_per_split)}"
        )
    check_image_size(image_size, WHAT)
    mean_t, std_t = check_normalization(mean, std, 3, WHAT)
    root_p = Path(root).expanduser().absolute()
    files = [root_p / f for s in SPLITS for f in (image_file(s, format), labels_file(s))]
    other = "npz" if format == "pickle" else "pickle"
    suffix = "_images.npz" if other == "npz" else "_images_png.pkl"
    ensure_files(files, root_p, url, md5, WHAT, hint=f" (or set format={other} for the {suffix} files)")
    channel_order = npz_channel_order if format == "npz" else "rgb"
    params = {"format": format, "image_size": image_size, "channels": channel_order}
    fp = fingerprint("tieredimagenet", FORMAT_VERSION, params, files)
    path = Path(cache_dir).expanduser() / f"tieredimagenet_{format}_{fp}.pt"
    expected = dict(zip(SPLITS, classes_per_split)) if classes_per_split is not None else {}

    def decode() -> dict:
        splits = {s: _decode_split(root_p, s, format, image_size, channel_order, expected.get(s)) for s in SPLITS}
        _check(splits, root_p, None)
        return {"image_size": image_size, "splits": splits}

    payload = cached(
        path,
        fp,
        FORMAT_VERSION,
        WHAT,
        splits_payload_valid(3, image_size),
        decode,
        describe=lambda d: format,
        mmap=True,
    )
    splits = payload["splits"]
    _check(splits, root_p, classes_per_split)
    for s in SPLITS:
        n = len(splits[s]["class_names"])
        st = splits[s]["counts"]
        log.info(
            "%s %s: %d classes with %d to %d images each; kept the first %d of every class (dropped %d images)",
            WHAT,
            s,
            n,
            st["kept"],
            st["max"],
            st["kept"],
            st["dropped"],
        )
    return FewShotDataset(
        name="tieredimagenet",
        splits=banks_from_payload(payload),
        channels=3,
        image_size=image_size,
        mean=mean_t,
        std=std_t,
    )


def _count_error(root: Path, split: str, have: int, want: int) -> DataError:
    return DataError(
        f"{root / labels_file(split)}: the {split} split has {have} classes, expected {want} "
        "(classes_per_split); replace the files with the original tieredImageNet or set classes_per_split"
    )


def _check(splits: dict[str, dict[str, Any]], root: Path, classes_per_split: Optional[Sequence[int]]) -> None:
    """No class (or superclass) in two splits, and the expected class counts when given."""
    seen: dict[str, str] = {}
    seen_super: dict[str, str] = {}
    for i, s in enumerate(SPLITS):
        names = list(splits[s]["class_names"])
        if classes_per_split is not None and len(names) != int(classes_per_split[i]):
            raise _count_error(root, s, len(names), int(classes_per_split[i]))
        for n in names:
            if n in seen and seen[n] != s:
                raise DataError(
                    f"{WHAT} class {n} is in both the {seen[n]} and {s} splits of {root}; the files are mixed up"
                )
            seen[n] = s
        if len(set(names)) != len(names):
            raise DataError(f"{root / labels_file(s)} names a class twice")
        for sup in set(splits[s].get("superclasses", [])):
            if sup in seen_super and seen_super[sup] != s:
                raise DataError(
                    f"{WHAT} superclass {sup} is in both the {seen_super[sup]} "
                    f"and {s} splits of {root}; the files are mixed up"
                )
            seen_super[sup] = s
