"""Lake et al. (2015)'s one-shot benchmark (all_runs.zip): loading the real file, the episode, the report,
and DataErrors on missing or malformed zips (built in tmp_path)."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest_data import _in_ci, data_root_candidates
from fewshot.benchmarks.lake import LAKE_ZIP_NAME, LakeRun, lake_episode, lake_report, lake_zip_path, load_lake_runs
from fewshot.data import omniglot as og
from fewshot.data.base import DataError, Episode, SplitBank
from fewshot.data.sampler import EpisodeSampler

CHANCE_ERROR = 95.0  # 20-way: 19 of 20 guesses are wrong


def _find_lake_zip() -> Path:
    candidates = [lake_zip_path(base) for base in data_root_candidates()]
    for path in candidates:
        if path.is_file():
            return path
    msg = f"Lake's {LAKE_ZIP_NAME} missing: looked at {' and '.join(map(str, candidates))}; set FEWSHOT_DATA_ROOT"
    if _in_ci():
        pytest.fail(f"CI is set and {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def lake_zip() -> Path:
    return _find_lake_zip()


@pytest.fixture(scope="module")
def runs(lake_zip: Path) -> list[LakeRun]:
    return load_lake_runs(lake_zip, image_size=28)


# --------------------------------------------------------------------------------------------- real file


@pytest.mark.omniglot
def test_real_runs_layout(runs, lake_zip):
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for r in runs:
        assert r.support.shape == r.query.shape == (20, 1, 28, 28)
        assert r.support.dtype == r.query.dtype == torch.uint8
        assert r.query_labels.dtype == torch.int64 and r.query_labels.shape == (20,)
        assert r.support_files == [f"{r.name}/training/class{i:02d}.png" for i in range(1, 21)]
        assert r.query_files == [f"{r.name}/test/item{i:02d}.png" for i in range(1, 21)]
        # Every run's answer key is a permutation: each training class has exactly one test drawing.
        assert sorted(r.query_labels.tolist()) == list(range(20))
    # The first lines of run01/class_labels.txt: item01 -> class08, item02 -> class09, item03 -> class02.
    assert runs[0].query_labels[:3].tolist() == [7, 8, 1]
    with zipfile.ZipFile(lake_zip) as zf:  # the key read back against the file itself, for every run
        for r in runs:
            pairs = dict(
                line.split() for line in zf.read(f"{r.name}/class_labels.txt").decode().splitlines() if line.strip()
            )
            assert [r.support_files[k] for k in r.query_labels.tolist()] == [pairs[q] for q in r.query_files]


@pytest.mark.omniglot
def test_real_images_preprocessed_like_omniglot(runs, lake_zip):
    for r in runs:
        for x in (r.support, r.query):
            # Bright strokes on a dark background: mostly 0, a few bright pixels, corners empty.
            assert x.float().mean() < 60
            assert x.amax().item() >= 200
            assert (x[..., 0, 0] == 0).all() and (x[..., -1, -1] == 0).all()
    # Exactly omniglot's decoding (Lanczos to 28 of the 'L' image, then 255 - x), checked on raw bytes.
    with zipfile.ZipFile(lake_zip) as zf:
        for r, i in ((runs[0], 0), (runs[7], 13), (runs[19], 19)):
            want = og.decode_drawing(zf.read(r.query_files[i]), 28)
            assert np.array_equal(r.query[i, 0].numpy(), want)
            with Image.open(io.BytesIO(zf.read(r.support_files[i]))) as im:
                assert im.size == (105, 105)
                ref = 255 - np.asarray(im.convert("L").resize((28, 28), Image.Resampling.LANCZOS), dtype=np.uint8)
            assert np.array_equal(r.support[i, 0].numpy(), ref)


@pytest.mark.omniglot
def test_real_deterministic_and_sizes(runs, lake_zip):
    again = load_lake_runs(str(lake_zip), image_size=28)
    for a, b in zip(runs, again):
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
        assert torch.equal(a.query_labels, b.query_labels)
    big = load_lake_runs(lake_zip, image_size=105)  # native size: no resize, only the inversion
    assert big[0].support.shape == (20, 1, 105, 105)
    assert set(big[0].support.unique().tolist()) <= {0, 255}
    assert all(torch.equal(a.query_labels, b.query_labels) for a, b in zip(runs, big))


def _nn_errors(runs: list[LakeRun], metric: str, labels: list[torch.Tensor] | None = None) -> dict:
    accs = []
    for i, r in enumerate(runs):
        s, q = r.support.flatten(1).float(), r.query.flatten(1).float()
        if metric == "cosine":
            dist = -(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(s, dim=1).T)
        else:
            dist = torch.cdist(q, s)
        y = r.query_labels if labels is None else labels[i]
        accs.append((dist.argmin(1) == y).float().mean().item())
    return lake_report(accs, runs)


@pytest.mark.omniglot
def test_real_pixel_nearest_neighbour_beats_chance(runs):
    """1-NN on raw 28x28 pixels: measured 76.75% error (cosine) and 79.00% (L2), chance is 95%.

    Per run (cosine): run01 65%, run02 95%, run05 60%, run17 85%. The bound leaves ~8 points for other
    Pillow versions; a wrong or misaligned answer key would sit at chance (checked below with shuffled keys).
    """
    cos, l2 = _nn_errors(runs, "cosine"), _nn_errors(runs, "l2")
    assert 65.0 < cos["mean_error"] < CHANCE_ERROR - 10, cos["markdown"]
    assert 65.0 < l2["mean_error"] < CHANCE_ERROR - 8, l2["markdown"]
    assert cos["mean_error"] == pytest.approx(76.75, abs=3.0)
    # Control: the same classifier scored against a rotated answer key is at chance level (400 trials: sd ~1.1).
    shifted = [(r.query_labels + 1) % 20 for r in runs]
    assert _nn_errors(runs, "cosine", shifted)["mean_error"] > CHANCE_ERROR - 7


@pytest.mark.omniglot
def test_real_episode(runs):
    ep = lake_episode(runs)
    assert isinstance(ep, Episode) and ep.tasks == 20
    assert ep.support_x.shape == ep.query_x.shape == (20, 20, 1, 28, 28)
    assert ep.support_x.dtype == ep.query_x.dtype == torch.float32
    assert ep.support_y.shape == ep.query_y.shape == (20, 20)
    assert ep.support_y.dtype == ep.query_y.dtype == torch.int64
    assert torch.equal(ep.support_y, torch.arange(20).expand(20, -1))
    assert torch.equal(ep.query_y, torch.stack([r.query_labels for r in runs]))
    torch.testing.assert_close(ep.support_x[3], runs[3].support.float() / 255)
    assert 0.0 <= ep.query_x.min() and ep.query_x.max() <= 1.0
    # Only the first few runs: T follows the list.
    assert lake_episode(runs[:2]).support_x.shape == (2, 20, 1, 28, 28)


# --------------------------------------------------------------------------------------------- episode (no data)


def _fake_run(name: str, seed: int, size: int = 6) -> LakeRun:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(20, generator=g)
    return LakeRun(
        name=name,
        support=torch.randint(0, 256, (20, 1, size, size), dtype=torch.uint8, generator=g),
        query=torch.randint(0, 256, (20, 1, size, size), dtype=torch.uint8, generator=g),
        query_labels=labels,
        support_files=[f"{name}/training/class{i:02d}.png" for i in range(1, 21)],
        query_files=[f"{name}/test/item{i:02d}.png" for i in range(1, 21)],
    )


def test_episode_normalization_matches_sampler():
    runs = [_fake_run("run01", 0), _fake_run("run02", 1)]
    mean, std = (0.3,), (0.2,)
    ep = lake_episode(runs, mean=mean, std=std)
    torch.testing.assert_close(ep.query_x[1], (runs[1].query.float() / 255 - 0.3) / 0.2)
    # Bit-identical to what EpisodeSampler makes from the same uint8 images: every image it draws from a bank
    # holding run01's support and query drawings is exactly one of lake_episode's normalized images.
    bank = SplitBank(
        images=torch.stack([runs[0].support, runs[0].query], dim=1), class_names=[str(i) for i in range(20)]
    )
    drawn = EpisodeSampler(bank, ways=20, shots=1, queries=1, mean=mean, std=std).sample(1)
    ours = torch.cat([ep.support_x[0], ep.query_x[0]])
    for x in torch.cat([drawn.support_x[0], drawn.query_x[0]]):
        assert any(torch.equal(x, y) for y in ours)
    assert torch.equal(ep.query_y, torch.stack([r.query_labels for r in runs]))


def test_episode_rejects_bad_input():
    with pytest.raises(DataError, match="at least one run"):
        lake_episode([])
    with pytest.raises(DataError, match="same image_size"):
        lake_episode([_fake_run("run01", 0, size=6), _fake_run("run02", 1, size=8)])


# --------------------------------------------------------------------------------------------- report


def test_report_arithmetic():
    names = [f"run{i:02d}" for i in range(1, 5)]
    rep = lake_report([1.0, 0.95, 0.5, 0.0], names)
    assert rep["error_per_run"] == pytest.approx({"run01": 0.0, "run02": 5.0, "run03": 50.0, "run04": 100.0})
    assert rep["mean_error"] == pytest.approx(38.75)
    assert rep["mean_accuracy"] == pytest.approx(0.6125)
    assert [row["run"] for row in rep["runs"]] == names
    md = rep["markdown"].splitlines()
    assert md[0] == "| run | error (%) |" and md[1].startswith("| ---")
    assert md[3] == "| run02 | 5.0 |"
    assert md[-1] == "| **mean** | **38.75** |"
    assert len(md) == 2 + 4 + 1
    # LakeRun objects work as well as names.
    runs = [_fake_run("run07", 0), _fake_run("run08", 1)]
    assert lake_report([0.9, 0.8], runs)["error_per_run"] == pytest.approx({"run07": 10.0, "run08": 20.0})


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match="2 accuracies for 3 runs"):
        lake_report([0.5, 0.5], ["a", "b", "c"])
    with pytest.raises(ValueError, match="fractions"):
        lake_report([95.0], ["run01"])
    with pytest.raises(ValueError, match="fractions"):
        lake_report([float("nan")], ["run01"])


# --------------------------------------------------------------------------------------------- malformed zips


def _png(seed: int, size: int = 12) -> bytes:
    rng = random.Random(seed)
    im = Image.new("1", (size, size), 1)  # white, like Lake's drawings
    for _ in range(10):
        im.putpixel((rng.randrange(size), rng.randrange(size)), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _layout(runs: int = 20) -> dict[str, bytes]:
    """A well-formed all_runs.zip content with tiny PNGs and a shuffled answer key per run."""
    entries: dict[str, bytes] = {}
    for r in range(1, runs + 1):
        run = f"run{r:02d}"
        perm = list(range(1, 21))
        random.Random(r).shuffle(perm)
        lines = []
        for i in range(1, 21):
            entries[f"{run}/training/class{i:02d}.png"] = _png(1000 * r + i)
            entries[f"{run}/test/item{i:02d}.png"] = _png(1000 * r + 100 + i)
            lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{perm[i - 1]:02d}.png")
        entries[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    return entries


def _write(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_synthetic_zip_loads(tmp_path):
    runs = load_lake_runs(_write(tmp_path / LAKE_ZIP_NAME, _layout()), image_size=6)
    assert len(runs) == 20 and runs[4].name == "run05"
    perm = list(range(1, 21))
    random.Random(5).shuffle(perm)
    assert runs[4].query_labels.tolist() == [p - 1 for p in perm]
    assert runs[4].support.shape == (20, 1, 6, 6)


def _key_lines(entries: dict[str, bytes], run: str) -> list[str]:
    return entries[f"{run}/class_labels.txt"].decode().splitlines()


@pytest.mark.parametrize(
    "case, match",
    [
        ("19 runs", "holds 19 runs"),
        ("missing test image", "20 training and 19 test PNGs"),
        ("key to missing file", "training image 'run03/training/class21.png' is not one"),
        ("key to missing test", "test image 'run03/test/item99.png' is not one"),
        ("short key", "has 19 answers; expected 20"),
        ("duplicate test in key", "answered twice"),
        ("bad key line", "is not 'test/itemKK.png"),
        ("unsafe name", "points outside its folder"),
        ("corrupt png", "cannot decode run02/training/class05.png"),
    ],
)
def test_malformed_zip(tmp_path, case, match):
    e = _layout()
    if case == "19 runs":
        e = {k: v for k, v in e.items() if not k.startswith("run20/")}
    elif case == "missing test image":
        del e["run04/test/item07.png"]
    elif case == "key to missing file":
        lines = _key_lines(e, "run03")
        lines[5] = "run03/test/item06.png run03/training/class21.png"
        e["run03/class_labels.txt"] = "\n".join(lines).encode()
    elif case == "key to missing test":
        lines = _key_lines(e, "run03")
        lines[0] = "run03/test/item99.png run03/training/class01.png"
        e["run03/class_labels.txt"] = "\n".join(lines).encode()
    elif case == "short key":
        e["run03/class_labels.txt"] = "\n".join(_key_lines(e, "run03")[:19]).encode()
    elif case == "duplicate test in key":
        lines = _key_lines(e, "run03")
        lines[1] = lines[0]
        e["run03/class_labels.txt"] = "\n".join(lines).encode()
    elif case == "bad key line":
        lines = _key_lines(e, "run03")
        lines[2] = "run03/test/item03.png"
        e["run03/class_labels.txt"] = "\n".join(lines).encode()
    elif case == "unsafe name":
        e["../evil.png"] = b"x"
    elif case == "corrupt png":
        e["run02/training/class05.png"] = b"not a png"
    path = _write(tmp_path / LAKE_ZIP_NAME, e)
    with pytest.raises(DataError, match=match):
        load_lake_runs(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / LAKE_ZIP_NAME
    path.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_lake_runs(path)


def test_missing_zip_names_path(tmp_path):
    path = tmp_path / "omniglot" / LAKE_ZIP_NAME
    with pytest.raises(DataError) as info:
        load_lake_runs(path)
    msg = str(info.value)
    assert str(path) in msg and "<data_root>/omniglot/all_runs.zip" in msg
    with pytest.raises(DataError, match="is a folder"):
        load_lake_runs(tmp_path)
    with pytest.raises(DataError, match="positive"):
        load_lake_runs(path, image_size=0)
    assert lake_zip_path(tmp_path) == path
