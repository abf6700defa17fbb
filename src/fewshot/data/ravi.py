"""The Ravi & Larochelle (2017) split of miniImageNet: its CSV files ({train,val,test}.csv, header
``filename,label``), where they are looked for, and the check that a split's class list matches them."""

from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from fewshot.data.base import DataError
from fewshot.data.dataset import SPLITS

CSV_NAMES: dict[str, str] = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
RAVI_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
WHAT = "miniImageNet"


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a Ravi split CSV (header ``filename,label``)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the split file {path} ({e}); restore it from the Ravi split") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} does not start with the header 'filename,label'; restore it from the Ravi split")
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'filename,label', got {','.join(row)!r}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images; restore it from the Ravi split")
    return out


def split_dir_candidates(root: Path, split_dir: Optional[Path]) -> list[Path]:
    """Where the Ravi CSVs are looked for, in order: root/splits/ravi, root (next to images/), split_dir."""
    out: list[Path] = []
    for d in (root / "splits" / "ravi", root, split_dir):
        if d is not None and all(d.resolve() != o.resolve() for o in out):
            out.append(d)
    return out


def find_split_dir(root: Path, split_dir: Optional[Path]) -> Optional[Path]:
    """The first candidate folder holding all three Ravi CSVs, or None."""
    for d in split_dir_candidates(root, split_dir):
        if all((d / n).is_file() for n in CSV_NAMES.values()):
            return d
    return None


def group_by_class(rows: Sequence[tuple[str, str]]) -> "OrderedDict[str, list[str]]":
    by_class: OrderedDict[str, list[str]] = OrderedDict()
    for filename, label in rows:
        by_class.setdefault(label, []).append(filename)
    return by_class


def split_classes(folder: Path) -> dict[str, list[str]]:
    """Class wnids of each split as listed in folder/{train,val,test}.csv (order of first appearance)."""
    return {s: list(group_by_class(read_split_csv(folder / CSV_NAMES[s]))) for s in SPLITS}


def _diff(have: Sequence[str], want: Sequence[str]) -> str:
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if extra:
        parts.append(f"unexpected {len(extra)} ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    return "; ".join(parts)


def check_classes(
    classes: dict[str, list[str]], source: str, reference: Optional[dict[str, list[str]]], ref_dir: Optional[Path]
) -> None:
    """64/16/20 distinct classes, no class in two splits, and (when given) the same classes as the split files."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        names = classes[split]
        if len(set(names)) != len(names):
            raise DataError(f"{WHAT} {split} split in {source} lists a class twice")
        if len(names) != RAVI_CLASSES[split]:
            raise DataError(
                f"{WHAT} {split} split in {source} has {len(names)} classes, the Ravi split "
                f"has {RAVI_CLASSES[split]}; replace the files with the original miniImageNet"
            )
        for n in names:
            if n in seen:
                raise DataError(
                    f"{WHAT} class {n} is in both the {seen[n]} and {split} splits of {source}; the files are mixed up"
                )
            seen[n] = split
        if reference is not None and set(names) != set(reference[split]):
            raise DataError(
                f"{WHAT} {split} classes in {source} differ from the Ravi split file "
                f"{ref_dir / CSV_NAMES[split]}: {_diff(names, reference[split])}"
            )
