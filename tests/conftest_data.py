"""Fixtures for tests that need the real Omniglot zips (import them into tests/conftest.py).

Data root: $FEWSHOT_DATA_ROOT, else ../shared/data next to the repository. Without the zips the tests
skip, except under CI (env CI set), where missing data is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_ZIPS = ("images_background.zip", "images_evaluation.zip")


def _in_ci() -> bool:
    """CI (or FEWSHOT_REQUIRE_DATA, which .ci/run sets) turns a would-be skip into a failure."""
    return any(
        os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no") for v in ("CI", "FEWSHOT_REQUIRE_DATA")
    )


def data_root_candidates() -> list[Path]:
    """Folders that may hold omniglot/, in the order they are tried."""
    candidates = []
    if os.environ.get("FEWSHOT_DATA_ROOT"):
        candidates.append(Path(os.environ["FEWSHOT_DATA_ROOT"]).expanduser())
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    return candidates


def find_omniglot_root() -> Path | None:
    """The first <data root>/omniglot holding both Omniglot zips, or None."""
    for base in data_root_candidates():
        folder = (base / "omniglot").resolve()
        if all((folder / z).is_file() for z in OMNIGLOT_ZIPS):
            return folder
    return None


def require_omniglot_root() -> Path:
    """find_omniglot_root(), or skip the calling test (fail it when CI is set) with where it looked."""
    root = find_omniglot_root()
    if root is None:
        where = " or ".join(str(b / "omniglot") for b in data_root_candidates())
        msg = f"Omniglot zips ({', '.join(OMNIGLOT_ZIPS)}) missing: looked in {where}; set FEWSHOT_DATA_ROOT"
        if _in_ci():
            pytest.fail(f"CI is set and the {msg}", pytrace=False)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """Folder with the real images_background.zip / images_evaluation.zip (and splits/vinyals/)."""
    return require_omniglot_root()


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session, so the 32,460 PNGs are decoded once per image size."""
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot_28(omniglot_root: Path, omniglot_cache_dir: Path):
    """The real Omniglot, 28x28, Finn split (seed 1); decoded on first use, from the session cache after."""
    from fewshot.data.omniglot import load_omniglot

    return load_omniglot(
        str(omniglot_root), str(omniglot_cache_dir), image_size=28, split="finn", split_seed=1, download=False
    )
