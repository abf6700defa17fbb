"""Restricted unpickling: the datasets ship as pickles, and loading a pickle runs whatever code it names;
``restricted_load`` only lets through what rebuilds numpy arrays, dicts, lists and strings."""

from __future__ import annotations

import codecs
import contextlib
import importlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fewshot.data.base import DataError


def _numpy_attr(module: str, name: str) -> Any:
    """numpy.<module>.<name> under either spelling: numpy 2 pickles name numpy._core, older ones numpy.core."""
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
            f"refusing to load {path} ({e}): {what} pickles hold only numpy arrays, lists "
            "and dicts; this file may be corrupt or malicious, replace it with the original"
        ) from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(
            f"cannot read {path} as a {what} pickle ({type(e).__name__}: {e}); replace it with the original"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path} ({e})") from e


def get_key(d: Any, key: str, path: Path, what: str) -> Any:
    """d[key] for a dict from a pickle, whose keys may be str (Python 3, or latin1-decoded Python 2) or bytes."""
    if not isinstance(d, dict):
        raise DataError(
            f"{path} holds a {type(d).__name__}, not the dict a {what} file holds; replace it with the original"
        )
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    keys = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in d))
    raise DataError(
        f"{path} has no {key!r} entry (it has: {keys}); it is not a {what} file, replace it with the original"
    )


def as_text(value: Any) -> str:
    """A class name from a pickle: bytes and numpy strings become str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
