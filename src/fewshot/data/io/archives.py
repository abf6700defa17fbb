"""Archives read or extracted safely: a zip or tar entry named to land outside its folder (zip-slip: absolute,
drive-letter or '..' paths), or a tar link or device, is refused before anything is written."""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

from fewshot.data.base import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def unsafe_member(name: str) -> bool:
    """True for entry names that could land outside the target folder (absolute, drive, or '..')."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return True
    return any(part == ".." for part in norm.split("/"))


def check_zip_members(zip_path: Path, names: Iterable[str]) -> None:
    for name in names:
        if unsafe_member(name):
            raise DataError(
                f"{zip_path} has an entry {name!r} that points outside its folder; "
                "the zip is corrupt or malicious, delete it and download it again"
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
                raise DataError(
                    f"{zip_path} entry {info.filename!r} would land "
                    f"outside {root}; delete the zip and download it again"
                )
        dest.mkdir(parents=True, exist_ok=True)
        return [Path(zf.extract(info, root)) for info in infos if not info.is_dir()]


def safe_extract_archive(archive: Path, dest: Path) -> None:
    """Extract a tar or zip into dest, refusing entries that would land outside it, links and device files."""
    if archive.name.lower().endswith(".zip"):
        safe_extract(archive, dest)
        return
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                if unsafe_member(m.name) or not (m.isfile() or m.isdir()):
                    raise DataError(
                        f"{archive} has an entry {m.name!r} that is a link, a device or points outside "
                        "its folder; the archive is corrupt or malicious, delete it and download it again"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            tf.extractall(dest, members=members, filter="data")  # the "data" filter: a second line of defence
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive} into {dest} ({e}); delete the archive and download it again") from e
