"""Arrays out of .npz files, memory-mapped in place when stored uncompressed (np.savez), so a GB-sized array
is not read whole just to take some of its rows."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fewshot.data.base import DataError
from fewshot.data.io.decode import corrupt


def _mapped(path: Path, zf: zipfile.ZipFile, member: str) -> np.ndarray | None:
    """The member as a read-only memmap, or None when it is compressed or not a plain array."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError("bad local zip header")
        extra = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + extra)  # past the local header, name and extra field: the .npy itself
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)


def npz_array(path: Path, key: str, what: str) -> np.ndarray:
    """The array `key` of an npz: memory-mapped when stored uncompressed, else read whole (never unpickled)."""
    try:
        with zipfile.ZipFile(path) as zf:
            mapped = _mapped(path, zf, f"{key}.npy")
        if mapped is not None:
            return mapped
    except KeyError as e:
        raise DataError(f"{path} has no {key!r} array; it is not a {what} npz, replace it with the original") from e
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise corrupt(path, what, e) from e
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise corrupt(path, what, e) from e
