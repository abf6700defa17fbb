"""CIFAR-FS (Bertinetto et al., 2019) and FC100 (Oreshkin et al., 2018) from the CIFAR-100 python pickles, 32x32.

Both use all 600 images of each CIFAR-100 class (its 500 train + 100 test images merged):

- CIFAR-FS: 64/16/20 fine classes, by the split files ``{train,val,test}.txt`` (one fine-label name a line)
  of bertinetto/r2d2, looked for in ``split_dir``.
- FC100: 60/20/20 fine classes, split by superclass (coarse label) so that train and test share no superclass;
  the superclass lists are ``FC100_SUPERCLASSES`` below.

The pickles (``cifar-100-python/{train,test,meta}``, written by Python 2) are read with a restricted unpickler
that only rebuilds numpy arrays, lists and dicts. All 100 classes are decoded once into one cache file in
``cache_dir`` (shared by both datasets) under a fingerprint of the pickles and the image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fewshot.data.base import DataError, SplitBank
from fewshot.data.dataset import SPLITS, FewShotDataset, check_image_size, check_normalization, task_source
from fewshot.data.io.cache import cached, is_uint8_bank
from fewshot.data.io.decode import resize_banks, to_bank
from fewshot.data.io.download import ensure_files
from fewshot.data.io.hashing import fingerprint
from fewshot.data.io.pickles import as_text, get_key, restricted_load

CIFAR_DIR = "cifar-100-python"
CIFAR_FILES: tuple[str, ...] = ("train", "test", "meta")
NUM_FINE = 100
NUM_COARSE = 20
FINE_PER_COARSE = 5
CIFAR_SIZE = 32
# The official archive (also torchvision's CIFAR100): named in messages, not downloaded unless url is set.
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

CIFAR_FS_FILES: dict[str, str] = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
CIFAR_FS_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}

# FC100 (Oreshkin, Rodriguez, Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot learning",
# NeurIPS 2018, Sec. 4 / supplementary; code github.com/ElementAI/TADAM): CIFAR-100 split by superclass,
# 12/4/4 superclasses = 60/20/20 classes. By CIFAR-100 coarse-label index (meta's coarse_label_names order):
#   train  1 fish, 2 flowers, 3 food_containers, 4 fruit_and_vegetables, 5 household_electrical_devices,
#          6 household_furniture, 9 large_man-made_outdoor_things, 10 large_natural_outdoor_scenes,
#          15 reptiles, 17 trees, 18 vehicles_1, 19 vehicles_2
#   val    8 large_carnivores, 11 large_omnivores_and_herbivores, 13 non-insect_invertebrates, 16 small_mammals
#   test   0 aquatic_mammals, 7 insects, 12 medium_mammals, 14 people
# The same sets appear as `class_split` in public re-implementations that cite TADAM's code (e.g. a
# create_dataset_cifar100.py "based on github.com/ElementAI/TADAM"); TADAM's own file was not at hand to compare.
FC100_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}
# Bump when decoding or the cache layout changes, so old caches are rebuilt.
FORMAT_VERSION = 1
FORMATS: tuple[str, ...] = ("pickle",)
WHAT = "CIFAR-100"


# --------------------------------------------------------------------------------------------- decoding


def cifar_dir(root: Path) -> Path:
    """root/cifar-100-python, or root itself when the pickles sit directly in it."""
    sub = root / CIFAR_DIR
    if not all((sub / n).is_file() for n in CIFAR_FILES) and all((root / n).is_file() for n in CIFAR_FILES):
        return root
    return sub


def _labels(value: Any, n: int, path: Path, key: str, high: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {key} is not a list of integers ({e}); replace it with the original") from e
    if len(arr) != n or (n and (arr.min() < 0 or arr.max() >= high)):
        raise DataError(
            f"{path}: {key} has {len(arr)} labels for {n} images or "
            f"labels outside 0..{high - 1}; replace it with the original"
        )
    return arr


def _names(value: Any, n: int, path: Path, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise DataError(f"{path}: {key} is not a list of {n} names; replace it with the original")
    return [as_text(v) for v in value]


def _decode_cifar100(folder: Path, image_size: int, images_per_class: int) -> dict[str, Any]:
    """The three pickles -> all 100 classes as (100, images_per_class, 3, S, S) uint8 plus the label names."""
    datas, fines, coarses = [], [], []
    for name in ("train", "test"):
        path = folder / name
        d = restricted_load(path, WHAT)
        data = get_key(d, "data", path, WHAT)
        row = 3 * CIFAR_SIZE * CIFAR_SIZE
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == row):
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: data is {desc}, expected N x 3072 uint8; replace it with the original")
        datas.append(data)
        fines.append(_labels(get_key(d, "fine_labels", path, WHAT), len(data), path, "fine_labels", NUM_FINE))
        coarses.append(_labels(get_key(d, "coarse_labels", path, WHAT), len(data), path, "coarse_labels", NUM_COARSE))
    meta_path = folder / "meta"
    meta = restricted_load(meta_path, WHAT)
    fine_names = _names(get_key(meta, "fine_label_names", meta_path, WHAT), NUM_FINE, meta_path, "fine_label_names")
    coarse_names = _names(
        get_key(meta, "coarse_label_names", meta_path, WHAT), NUM_COARSE, meta_path, "coarse_label_names"
    )

    data = np.concatenate(datas)
    fine, coarse = np.concatenate(fines), np.concatenate(coarses)
    counts = np.bincount(fine, minlength=NUM_FINE)
    bad = np.nonzero(counts != images_per_class)[0]
    if len(bad):
        c = int(bad[0])
        raise DataError(
            f"{folder}: class {fine_names[c]} has {counts[c]} images in train+test, "
            f"expected images_per_class={images_per_class} ({len(bad)} classes differ); "
            "replace the pickles with the original CIFAR-100 or set images_per_class"
        )
    coarse_of_fine = []
    for c in range(NUM_FINE):
        parents = np.unique(coarse[fine == c])
        if len(parents) != 1:
            raise DataError(
                f"{folder}: class {fine_names[c]} has coarse labels {parents.tolist()}, "
                "expected one; replace the pickles with the original"
            )
        coarse_of_fine.append(int(parents[0]))
    per_coarse = np.bincount(coarse_of_fine, minlength=NUM_COARSE)
    if (per_coarse != FINE_PER_COARSE).any():
        raise DataError(
            f"{folder}: superclasses hold {per_coarse.tolist()} classes, CIFAR-100 "
            f"has {FINE_PER_COARSE} in each; replace the pickles with the original"
        )

    order = np.argsort(fine, kind="stable")  # class-major; within a class, train images then test, in file order
    images = data[order].reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1)  # channel-first rows -> HWC
    images = resize_banks(np.ascontiguousarray(images), image_size, f"resizing {WHAT} to {image_size}x{image_size}")
    return {
        "images": to_bank(images, NUM_FINE, images_per_class),
        "fine_names": fine_names,
        "coarse_of_fine": coarse_of_fine,
        "coarse_names": coarse_names,
    }


def load_cifar100(
    root: str,
    cache_dir: str,
    image_size: int = 32,
    images_per_class: int = 600,
    url: Optional[str] = None,
    md5: Optional[str] = None,
) -> dict[str, Any]:
    """All CIFAR-100 classes, decoded once and cached: {'images': (100, per, 3, S, S) uint8 in fine-label order,
    'fine_names', 'coarse_of_fine' (coarse index of each fine class), 'coarse_names'}."""
    check_image_size(image_size, WHAT)
    if images_per_class < 1:
        raise DataError(f"{WHAT} images_per_class must be positive, got {images_per_class}")
    root_p = Path(root).expanduser().absolute()
    folder = cifar_dir(root_p)
    files = [folder / n for n in CIFAR_FILES]
    hint = f" (from the official archive {OFFICIAL_URL}, md5 {OFFICIAL_MD5}, which unpacks to {root_p / CIFAR_DIR})"
    ensure_files(files, root_p, url, md5, WHAT, hint=hint)
    folder = cifar_dir(root_p)
    files = [folder / n for n in CIFAR_FILES]
    params = {"image_size": image_size, "images_per_class": images_per_class}
    fp = fingerprint("cifar100", FORMAT_VERSION, params, files)
    shape = (NUM_FINE, images_per_class, 3, image_size, image_size)
    return cached(
        Path(cache_dir).expanduser() / f"cifar100_{fp}.pt",
        fp,
        FORMAT_VERSION,
        WHAT,
        valid=lambda d: (
            is_uint8_bank(d["images"], shape)
            and len(d["fine_names"]) == NUM_FINE
            and len(d["coarse_of_fine"]) == NUM_FINE
            and len(d["coarse_names"]) == NUM_COARSE
        ),
        decode=lambda: _decode_cifar100(folder, image_size, images_per_class),
        describe=lambda d: f"{NUM_FINE * images_per_class} images",
        mmap=True,
    )


# --------------------------------------------------------------------------------------------- splits


def read_cifar_fs_split(split_dir: Path) -> dict[str, list[str]]:
    """The CIFAR-FS class names of each split, from split_dir/{train,val,test}.txt (one name a line)."""
    missing = [split_dir / n for n in CIFAR_FS_FILES.values() if not (split_dir / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-FS split files not found: put {', '.join(str(p) for p in missing)} "
            "there (the cifar-fs_splits/ of bertinetto/r2d2), or set split_dir"
        )
    out = {}
    for split, name in CIFAR_FS_FILES.items():
        path = split_dir / name
        try:
            out[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path} ({e}); restore the CIFAR-FS split file") from e
    return out


def _bank(data: dict[str, Any], names: Sequence[str]) -> SplitBank:
    index = {n: i for i, n in enumerate(data["fine_names"])}
    idx = torch.tensor([index[n] for n in names], dtype=torch.long)
    return SplitBank(images=data["images"][idx], class_names=list(names))


def _check_format(format: str, what: str) -> None:
    if format not in FORMATS:
        raise DataError(f"unknown {what} format {format!r}; choose one of {', '.join(FORMATS)}")


@task_source
def load_cifar_fs(
    root: str,
    cache_dir: str,
    split_dir: str,
    format: str = "pickle",
    image_size: int = 32,
    images_per_class: int = 600,
    url: Optional[str] = None,
    md5: Optional[str] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> FewShotDataset:
    """CIFAR-FS: banks of uint8 (64|16|20, images_per_class, 3, S, S), classes in split-file order.

    root: folder with cifar-100-python/{train,test,meta} (or those three files directly).
    split_dir: folder with the CIFAR-FS train.txt, val.txt, test.txt.
    url, md5: an archive to download into root when the pickles are missing (e.g. the official
        cifar-100-python.tar.gz); None: local files only.
    """
    _check_format(format, "CIFAR-FS")
    mean_t, std_t = check_normalization(mean, std, 3, "CIFAR-FS")
    split_p = Path(split_dir).expanduser().absolute()
    classes = read_cifar_fs_split(split_p)  # before decoding anything: a missing split file fails fast
    data = load_cifar100(root, cache_dir, image_size, images_per_class, url, md5)
    known, seen = set(data["fine_names"]), {}
    for split, names in classes.items():
        path = split_p / CIFAR_FS_FILES[split]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(
                f"{path} names classes that are not CIFAR-100 fine "
                f"labels: {', '.join(unknown[:5])}; restore the split file"
            )
        if len(names) != CIFAR_FS_CLASSES[split] or len(set(names)) != len(names):
            raise DataError(
                f"{path} lists {len(names)} classes ({len(set(names))} distinct), "
                f"CIFAR-FS has {CIFAR_FS_CLASSES[split]}; restore the split file"
            )
        for n in names:
            if n in seen:
                raise DataError(f"CIFAR-FS class {n} is in both {seen[n]} and {path}; restore the split files")
            seen[n] = str(path)
    splits = {s: _bank(data, classes[s]) for s in SPLITS}
    return FewShotDataset(name="cifar_fs", splits=splits, channels=3, image_size=image_size, mean=mean_t, std=std_t)


def fc100_classes(fine_names: Sequence[str], coarse_of_fine: Sequence[int]) -> dict[str, list[str]]:
    """FC100's fine classes of each split (fine-label order), from the superclass lists."""
    return {s: [n for n, c in zip(fine_names, coarse_of_fine) if c in FC100_SUPERCLASSES[s]] for s in SPLITS}


@task_source
def load_fc100(
    root: str,
    cache_dir: str,
    format: str = "pickle",
    image_size: int = 32,
    images_per_class: int = 600,
    url: Optional[str] = None,
    md5: Optional[str] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> FewShotDataset:
    """FC100: banks of uint8 (60|20|20, images_per_class, 3, S, S), split by CIFAR-100 superclass
    (FC100_SUPERCLASSES), classes in fine-label order. Arguments as in load_cifar_fs."""
    _check_format(format, "FC100")
    mean_t, std_t = check_normalization(mean, std, 3, "FC100")
    data = load_cifar100(root, cache_dir, image_size, images_per_class, url, md5)
    classes = fc100_classes(data["fine_names"], data["coarse_of_fine"])
    splits = {s: _bank(data, classes[s]) for s in SPLITS}
    return FewShotDataset(name="fc100", splits=splits, channels=3, image_size=image_size, mean=mean_t, std=std_t)
