"""miniImageNet, CIFAR-FS, FC100 and tieredImageNet loaders on miniatures generated in their real on-disk formats.

No images of these datasets exist here, so each test writes a small copy in the exact format of the release
(pickles as Python 2 or 3 wrote them, Ravi CSVs + JPEG folder, PNG pickles, npz) and checks the loader on it.
Class lists come from the real split files in the shared data folder (miniImageNet Ravi CSVs, CIFAR-FS lists);
tests that need them skip when they are missing, and fail under CI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest_data import _in_ci, data_root_candidates
from fewshot.data import cifar, miniimagenet, tiered
from fewshot.data.base import DataError
from fewshot.data.io import ensure_files, restricted_load
from fewshot.engine import _plain

SPLITS = ("train", "val", "test")

# CIFAR-100 coarse label names in index order (meta's coarse_label_names).
COARSE_NAMES = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]


# --------------------------------------------------------------------------------------------- shared split files


def _shared(rel: str, names: tuple[str, ...]) -> Path:
    """The first <data root>/<rel> holding all names; skip (fail under CI) when none does."""
    for base in data_root_candidates():
        folder = (base / rel).resolve()
        if all((folder / n).is_file() for n in names):
            return folder
    where = " or ".join(str(b / rel) for b in data_root_candidates())
    msg = f"split files {', '.join(names)} missing: looked in {where}; set FEWSHOT_DATA_ROOT"
    if _in_ci():
        pytest.fail(f"CI is set and the {msg}", pytrace=False)
    pytest.skip(msg)


def _read_ravi(folder: Path) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for s in SPLITS:
        with open(folder / f"{s}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "label"]
        out[s] = [(r[0], r[1]) for r in rows[1:] if r]
    return out


@pytest.fixture(scope="module")
def ravi_dir() -> Path:
    return _shared("miniimagenet/splits/ravi", ("train.csv", "val.csv", "test.csv"))


@pytest.fixture(scope="module")
def ravi_rows(ravi_dir) -> dict[str, list[tuple[str, str]]]:
    return _read_ravi(ravi_dir)


@pytest.fixture(scope="module")
def ravi_classes(ravi_rows) -> dict[str, list[str]]:
    return {s: sorted({label for _, label in rows}) for s, rows in ravi_rows.items()}


@pytest.fixture(scope="module")
def cifar_fs_dir() -> Path:
    return _shared("cifar-fs/splits", ("train.txt", "val.txt", "test.txt", "all.txt"))


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- pickles as written


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, so str/bytes can be written as Python 2 did
    """Writes every str and bytes as a Python 2 byte string (SHORT_BINSTRING/BINSTRING), protocol 2: the
    format of cPickle files such as cifar-100-python/* and tieredImageNet's pickles."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _dump_py3(obj, path: Path, protocol: int = 4) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- miniatures


def _make_mini_pickles(root: Path, classes: dict[str, list[str]], per: int, protocol: int = 4, seed: int = 0) -> None:
    """mini-imagenet-cache-*.pkl: image_data N x 84 x 84 x 3 uint8, class_dict wnid -> row indices (shuffled rows).

    Pixel (0, 0) of each image holds (sorted class index, index within the class, 7)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, fname in miniimagenet.PICKLE_NAMES.items():
        names = sorted(classes[split])
        n = len(names) * per
        data = rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8)
        perm = rng.permutation(n)
        class_dict = {}
        for ci, name in enumerate(names):
            rows = perm[ci * per : (ci + 1) * per]
            class_dict[name] = [int(r) for r in rows]
            for j, r in enumerate(rows):
                data[r, 0, 0] = (ci, j, 7)
        _dump_py3({"image_data": data, "class_dict": class_dict}, root / fname, protocol)


def _make_cifar(
    root: Path, fine_names: list[str], coarse_of: dict[str, int], per_train: int = 5, per_test: int = 1, seed: int = 0
) -> Path:
    """cifar-100-python/{train,test,meta} as Python 2 cPickle wrote them: N x 3072 channel-first rows.

    Image j of class c (in file order, train then test) has R(0,0) = c and G(0,0) = j."""
    rng = np.random.default_rng(seed)
    folder = root / cifar.CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, per, offset in (("train", per_train, 0), ("test", per_test, per_train)):
        labels = rng.permutation(np.repeat(np.arange(100), per))  # classes interleaved, as in the real files
        seen = np.zeros(100, dtype=np.int64)
        rank = np.empty_like(labels)
        for i, c in enumerate(labels):  # rank = order within the class in this file
            rank[i], seen[c] = seen[c] + offset, seen[c] + 1
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        data[:, 0] = labels  # R plane, pixel (0, 0)
        data[:, 1024] = rank  # G plane, pixel (0, 0)
        _dump_py2(
            {
                "filenames": [f"img_{i}.png" for i in range(len(labels))],
                "batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": [int(x) for x in labels],
                "coarse_labels": [coarse_of[fine_names[x]] for x in labels],
                "data": data,
            },
            folder / name,
        )
    _dump_py2({"fine_label_names": fine_names, "coarse_label_names": COARSE_NAMES}, folder / "meta")
    return folder


def _cifar_names(cifar_fs_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Fine names in CIFAR-100 label order (alphabetical) and each one's coarse index.

    all.txt lists 5 per superclass."""
    all_names = _lines(cifar_fs_dir / "all.txt")
    assert len(all_names) == 100
    return sorted(all_names), {n: i // 5 for i, n in enumerate(all_names)}


def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(84, 84, 3), dtype=np.uint8)
    arr[0, 0] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


TIERED_SPEC = {  # split -> (superclasses, classes per superclass, images per class cycle)
    "train": (2, 3, (5, 4, 6)),
    "val": (1, 3, (4, 5, 4)),
    "test": (2, 2, (3, 4)),
}


def _make_tiered(root: Path, npz: bool = False, seed: int = 0) -> dict[str, dict]:
    """{split}_images_png.pkl (list of PNG numpy buffers, as cv2.imencode made them) or {split}_images.npz, and
    {split}_labels.pkl; class counts differ. Pixel (0, 0) = (class index, index within class, 9)."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    wnid, sup_id = 1000, 0
    for split, (supers, per_super, cycle) in TIERED_SPEC.items():
        names, general_names, labels, general, items, arrays = [], [], [], [], [], []
        for s in range(supers):
            general_names.append(f"n9{sup_id:07d}")
            sup_id += 1
            for _ in range(per_super):
                names.append(f"n0{wnid:07d}")
                wnid += 1
        counts = [cycle[i % len(cycle)] for i in range(len(names))]
        order = [c for c in range(len(names)) for _ in range(counts[c])]
        np.random.default_rng(seed).shuffle(order)
        seen = [0] * len(names)
        for k, c in enumerate(order):
            png = _png((c, seen[c], 9), seed=k)
            seen[c] += 1
            labels.append(c)
            general.append(c // per_super)
            items.append(np.frombuffer(png, dtype=np.uint8).copy())
            arrays.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        _dump_py2(
            {
                "label_specific": np.asarray(labels, dtype=np.int64),
                "label_general": np.asarray(general, dtype=np.int64),
                "label_specific_str": names,
                "label_general_str": general_names,
            },
            root / f"{split}_labels.pkl",
        )
        if npz:
            np.savez(root / f"{split}_images.npz", images=np.stack(arrays))
        else:
            _dump_py2(items, root / f"{split}_images_png.pkl")
        truth[split] = {"names": names, "min": min(counts), "counts": counts, "supers": general_names}
    return truth


@pytest.fixture(scope="module")
def mini_pickle_root(tmp_path_factory, ravi_classes) -> Path:
    root = tmp_path_factory.mktemp("mini_pickle")
    _make_mini_pickles(root, ravi_classes, per=6)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory, cifar_fs_dir) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    fine, coarse_of = _cifar_names(cifar_fs_dir)
    _make_cifar(root, fine, coarse_of)
    return root


# --------------------------------------------------------------------------------------------- miniImageNet


def _assert_banks(ds, counts: dict[str, int], per: int, size: int, channels: int = 3) -> None:
    for s in SPLITS:
        bank = ds.split(s)
        assert bank.images.dtype == torch.uint8
        assert tuple(bank.images.shape) == (counts[s], per, channels, size, size), s
        assert len(bank.class_names) == counts[s]
    names = [set(ds.split(s).class_names) for s in SPLITS]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_miniimagenet_pickle(mini_pickle_root, ravi_dir, ravi_classes, tmp_path):
    ds = miniimagenet.load_miniimagenet(
        str(mini_pickle_root),
        str(tmp_path / "cache"),
        split_dir=str(ravi_dir),
        images_per_class=6,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.3, 0.4),
    )
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 6, 84)
    assert ds.name == "miniimagenet" and ds.channels == 3 and ds.image_size == 84
    assert ds.mean == (0.4, 0.5, 0.6) and ds.std == (0.2, 0.3, 0.4)
    for s in SPLITS:
        bank = ds.split(s)
        assert sorted(bank.class_names) == ravi_classes[s]
        # pixel (0, 0) of image j of class c was written as (c, j, 7): rows were gathered per class, HWC -> CHW
        c = torch.arange(bank.num_classes).view(-1, 1).expand(-1, 6)
        j = torch.arange(6).view(1, -1).expand(bank.num_classes, -1)
        assert torch.equal(bank.images[:, :, 0, 0, 0].long(), c)
        assert torch.equal(bank.images[:, :, 1, 0, 0].long(), j)
        assert (bank.images[:, :, 2, 0, 0] == 7).all()


@pytest.mark.parametrize("protocol", [2, 5])
def test_miniimagenet_pickle_protocols(tmp_path, ravi_dir, ravi_classes, protocol):
    """Pickles from other Python/numpy versions: protocol 2 (bytes via _codecs.encode), 5 (out-of-band buffers)."""
    _make_mini_pickles(tmp_path / "root", ravi_classes, per=2, protocol=protocol)
    ds = miniimagenet.load_miniimagenet(
        str(tmp_path / "root"), str(tmp_path / "cache"), split_dir=str(ravi_dir), images_per_class=2
    )
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 2, 84)


def test_miniimagenet_cache_reused(mini_pickle_root, ravi_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = miniimagenet.load_miniimagenet(
        str(mini_pickle_root), str(cache), split_dir=str(ravi_dir), images_per_class=6
    )
    files = list(cache.glob("miniimagenet_pickle_*.pt"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(miniimagenet, "_decode_pickles", boom)
    monkeypatch.setattr(miniimagenet, "restricted_load", boom)
    second = miniimagenet.load_miniimagenet(
        str(mini_pickle_root), str(cache), split_dir=str(ravi_dir), images_per_class=6
    )
    for s in SPLITS:
        assert torch.equal(first.split(s).images, second.split(s).images)
        assert first.split(s).class_names == second.split(s).class_names
    # another preprocessing gets its own cache file
    monkeypatch.undo()
    miniimagenet.load_miniimagenet(
        str(mini_pickle_root), str(cache), split_dir=str(ravi_dir), images_per_class=6, image_size=42
    )
    assert len(list(cache.glob("miniimagenet_pickle_*.pt"))) == 2


def test_miniimagenet_pickle_resized(mini_pickle_root, ravi_dir, tmp_path):
    ds = miniimagenet.load_miniimagenet(
        str(mini_pickle_root), str(tmp_path / "c"), split_dir=str(ravi_dir), images_per_class=6, image_size=42
    )
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 6, 42)


def test_miniimagenet_count_checked(mini_pickle_root, ravi_dir, tmp_path):
    with pytest.raises(DataError, match=r"has 6 images, expected images_per_class=600"):
        miniimagenet.load_miniimagenet(str(mini_pickle_root), str(tmp_path / "c"), split_dir=str(ravi_dir))


def test_miniimagenet_classes_must_match_ravi(tmp_path, ravi_dir, ravi_classes):
    """A val class swapped with a test class: counts still 16/20, but the lists differ from the split files."""
    classes = {s: list(v) for s, v in ravi_classes.items()}
    classes["val"][0], classes["test"][0] = classes["test"][0], classes["val"][0]
    _make_mini_pickles(tmp_path / "root", classes, per=1)
    with pytest.raises(DataError, match=r"val classes .* differ from the Ravi split file .*val\.csv"):
        miniimagenet.load_miniimagenet(
            str(tmp_path / "root"), str(tmp_path / "c"), split_dir=str(ravi_dir), images_per_class=1
        )


def test_miniimagenet_splits_disjoint(tmp_path, ravi_classes):
    classes = {s: list(v) for s, v in ravi_classes.items()}
    classes["val"][0] = classes["train"][0]
    _make_mini_pickles(tmp_path / "root", classes, per=1)
    with pytest.raises(DataError, match="in both the train and val splits"):
        miniimagenet.load_miniimagenet(str(tmp_path / "root"), str(tmp_path / "c"), split_dir=None, images_per_class=1)


def _make_mini_csv(
    root: Path, ravi_rows, per: int, csv_dir: Path, size=(100, 90)
) -> dict[tuple[str, str], tuple[int, int, int]]:
    """The first `per` rows of each class of the real CSVs, and JPEGs of another size, one flat color each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    csv_dir.mkdir(parents=True, exist_ok=True)
    colors = {}
    rng = np.random.default_rng(1)
    for s in SPLITS:
        kept, count = [], {}
        for filename, label in ravi_rows[s]:
            if count.get(label, 0) < per:
                count[label] = count.get(label, 0) + 1
                kept.append((filename, label))
        with open(csv_dir / f"{s}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            w.writerows(kept)
        for filename, label in kept:
            color = tuple(int(x) for x in rng.integers(20, 236, 3))
            colors[(s, filename)] = color
            Image.new("RGB", size, color).save(root / "images" / filename, format="JPEG", quality=95)
    return colors


@pytest.mark.parametrize("where", ["splits/ravi", "."])
def test_miniimagenet_csv(tmp_path, ravi_dir, ravi_rows, ravi_classes, where):
    """Ravi CSV rows + images/ of 100x90 JPEGs, resized to 84x84; CSVs in root/splits/ravi or next to images/."""
    root = tmp_path / "mini"
    colors = _make_mini_csv(root, ravi_rows, 3, root / where)
    ds = miniimagenet.load_miniimagenet(
        str(root), str(tmp_path / "cache"), format="csv", split_dir=str(ravi_dir), images_per_class=3
    )
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 3, 84)
    for s in SPLITS:
        bank = ds.split(s)
        assert sorted(bank.class_names) == ravi_classes[s]
        first_file = next(f for f, label in ravi_rows[s] if label == bank.class_names[0])
        got = bank.images[0, 0].float().mean(dim=(1, 2))
        assert torch.allclose(got, torch.tensor(colors[(s, first_file)], dtype=torch.float32), atol=3), (
            got,
            colors[(s, first_file)],
        )


def test_miniimagenet_csv_cache_and_missing_image(tmp_path, ravi_dir, ravi_rows, monkeypatch):
    root = tmp_path / "mini"
    _make_mini_csv(root, ravi_rows, 1, root / "splits" / "ravi")
    miniimagenet.load_miniimagenet(
        str(root), str(tmp_path / "cache"), format="csv", split_dir=str(ravi_dir), images_per_class=1
    )
    monkeypatch.setattr(
        miniimagenet, "_decode_csv", lambda *a, **k: pytest.fail("decoded again instead of reading the cache")
    )
    miniimagenet.load_miniimagenet(
        str(root), str(tmp_path / "cache"), format="csv", split_dir=str(ravi_dir), images_per_class=1
    )
    victim = next((root / "images").iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=r"1 of the 100 images .* missing from " + re.escape(str(root / "images"))):
        miniimagenet.load_miniimagenet(
            str(root), str(tmp_path / "cache"), format="csv", split_dir=str(ravi_dir), images_per_class=1
        )


def test_miniimagenet_csv_must_match_real_split(tmp_path, ravi_dir, ravi_rows, ravi_classes):
    """A miniature CSV next to images/ with one val and one test class swapped differs from the split_dir files."""
    v0, t0 = ravi_classes["val"][0], ravi_classes["test"][0]
    rows = dict(ravi_rows)
    rows["val"] = [r for r in ravi_rows["val"] if r[1] != v0] + [r for r in ravi_rows["test"] if r[1] == t0]
    rows["test"] = [r for r in ravi_rows["test"] if r[1] != t0] + [r for r in ravi_rows["val"] if r[1] == v0]
    root = tmp_path / "mini"
    _make_mini_csv(root, rows, 1, root)
    with pytest.raises(DataError, match=r"val classes .* differ from the Ravi split file .*val\.csv"):
        miniimagenet.load_miniimagenet(
            str(root), str(tmp_path / "cache"), format="csv", split_dir=str(ravi_dir), images_per_class=1
        )


def test_miniimagenet_missing_message(tmp_path):
    root = tmp_path / "nothing"
    with pytest.raises(DataError) as e:
        miniimagenet.load_miniimagenet(str(root), str(tmp_path / "c"))
    msg = str(e.value)
    assert "\n" not in msg
    for name in miniimagenet.PICKLE_NAMES.values():
        assert str(root / name) in msg
    with pytest.raises(DataError) as e:
        miniimagenet.load_miniimagenet(str(root), str(tmp_path / "c"), format="csv", split_dir=str(tmp_path / "none"))
    assert str(root / "images") in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- CIFAR-FS / FC100


def test_cifar_fs(cifar_root, cifar_fs_dir, tmp_path):
    ds = cifar.load_cifar_fs(
        str(cifar_root),
        str(tmp_path / "cache"),
        str(cifar_fs_dir),
        images_per_class=6,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 6, 32)
    assert ds.name == "cifar_fs" and ds.mean == (0.5, 0.5, 0.5)
    fine, _ = _cifar_names(cifar_fs_dir)
    for s in SPLITS:
        bank = ds.split(s)
        assert bank.class_names == _lines(cifar_fs_dir / f"{s}.txt")
        labels = torch.tensor([fine.index(n) for n in bank.class_names])
        # R(0,0) = fine label, G(0,0) = rank (train images 0-4, then the test image 5): merged in order, CHW intact
        assert torch.equal(bank.images[:, :, 0, 0, 0].long(), labels.view(-1, 1).expand(-1, 6))
        assert torch.equal(bank.images[:, :, 1, 0, 0].long(), torch.arange(6).expand(bank.num_classes, -1))


def test_fc100(cifar_root, cifar_fs_dir, tmp_path):
    ds = cifar.load_fc100(str(cifar_root), str(tmp_path / "cache"), images_per_class=6)
    _assert_banks(ds, {"train": 60, "val": 20, "test": 20}, 6, 32)
    all_names = _lines(cifar_fs_dir / "all.txt")  # 5 fine names per superclass, in coarse-index order
    for s, supers in cifar.FC100_SUPERCLASSES.items():
        expected = {all_names[5 * c + k] for c in supers for k in range(5)}
        assert set(ds.split(s).class_names) == expected
    assert set(ds.split("test").class_names) >= {
        "beaver",
        "bee",
        "fox",
        "baby",
    }  # aquatic mammals, insects, medium mammals, people
    assert sorted(c for v in cifar.FC100_SUPERCLASSES.values() for c in v) == list(range(20))


def test_cifar_cache_shared_and_reused(cifar_root, cifar_fs_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = cifar.load_fc100(str(cifar_root), str(cache), images_per_class=6)
    monkeypatch.setattr(
        cifar, "_decode_cifar100", lambda *a, **k: pytest.fail("decoded again instead of reading the cache")
    )
    b = cifar.load_fc100(str(cifar_root), str(cache), images_per_class=6)
    cifar.load_cifar_fs(str(cifar_root), str(cache), str(cifar_fs_dir), images_per_class=6)  # same cache file
    assert len(list(cache.glob("cifar100_*.pt"))) == 1
    for s in SPLITS:
        assert torch.equal(a.split(s).images, b.split(s).images)


def test_cifar_counts_checked(cifar_root, cifar_fs_dir, tmp_path):
    with pytest.raises(DataError, match="expected images_per_class=600"):
        cifar.load_cifar_fs(str(cifar_root), str(tmp_path / "c"), str(cifar_fs_dir))


def test_cifar_fs_split_file_checked(cifar_root, cifar_fs_dir, tmp_path):
    bad = tmp_path / "splits"
    bad.mkdir()
    for s in SPLITS:
        (bad / f"{s}.txt").write_text((cifar_fs_dir / f"{s}.txt").read_text())
    (bad / "val.txt").write_text((cifar_fs_dir / "val.txt").read_text().replace("otter", "sea_otter"))
    with pytest.raises(DataError, match="not CIFAR-100 fine labels: sea_otter"):
        cifar.load_cifar_fs(str(cifar_root), str(tmp_path / "c"), str(bad), images_per_class=6)


def test_cifar_missing_message(tmp_path):
    root = tmp_path / "cifar100"
    with pytest.raises(DataError) as e:
        cifar.load_fc100(str(root), str(tmp_path / "c"))
    msg = str(e.value)
    assert "\n" not in msg
    for n in cifar.CIFAR_FILES:
        assert str(root / "cifar-100-python" / n) in msg
    assert cifar.OFFICIAL_URL in msg
    with pytest.raises(DataError) as e:
        cifar.load_cifar_fs(str(root), str(tmp_path / "c"), str(tmp_path / "no_splits"))
    assert str(tmp_path / "no_splits" / "train.txt") in str(e.value)


def test_cifar_download_archive(tmp_path, cifar_fs_dir):
    """url + md5: the archive is downloaded (a file:// URL here), checked and unpacked into root."""
    fine, coarse_of = _cifar_names(cifar_fs_dir)
    src = tmp_path / "src"
    _make_cifar(src, fine, coarse_of, per_train=1, per_test=1)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar-100-python", arcname="cifar-100-python")
    url = archive.as_uri()
    root = tmp_path / "root"
    with pytest.raises(DataError, match="md5 mismatch"):
        cifar.load_fc100(str(root), str(tmp_path / "c"), images_per_class=2, url=url, md5="0" * 32)
    assert not (root / "cifar-100-python").exists()
    ds = cifar.load_fc100(str(root), str(tmp_path / "c"), images_per_class=2, url=url, md5=_md5(archive))
    assert ds.split("train").images.shape == (60, 2, 3, 32, 32)
    assert (root / "cifar-100-python" / "meta").is_file()


def test_archive_with_escaping_entry_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"x"
        info = tarfile.TarInfo("../escaped")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="points outside"):
        ensure_files([tmp_path / "root" / "train"], tmp_path / "root", archive.as_uri(), None, "test data")
    assert not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------------------------- tieredImageNet


def _check_tiered(ds, truth, size=84):
    for s in SPLITS:
        bank = ds.split(s)
        t = truth[s]
        assert bank.class_names == t["names"]
        assert tuple(bank.images.shape) == (len(t["names"]), t["min"], 3, size, size)
        if size == 84:
            # pixel (0, 0) = (class, rank in file order, 9): each class keeps its first `min` images, RGB, CHW
            assert torch.equal(
                bank.images[:, :, 0, 0, 0].long(), torch.arange(bank.num_classes).view(-1, 1).expand(-1, t["min"])
            )
            assert torch.equal(bank.images[:, :, 1, 0, 0].long(), torch.arange(t["min"]).expand(bank.num_classes, -1))
            assert (bank.images[:, :, 2, 0, 0] == 9).all()
    names = [set(ds.split(s).class_names) for s in SPLITS]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_tiered_png_pickle(tmp_path, caplog):
    truth = _make_tiered(tmp_path / "tiered")
    caplog.set_level("INFO", logger="fewshot.data.tiered")
    ds = tiered.load_tieredimagenet(
        str(tmp_path / "tiered"),
        str(tmp_path / "cache"),
        classes_per_split=[6, 3, 4],
        mean=(0.1, 0.2, 0.3),
        std=(1, 1, 1),
    )
    assert ds.name == "tieredimagenet" and ds.mean == (0.1, 0.2, 0.3)
    _check_tiered(ds, truth)
    assert "train: 6 classes with 4 to 6 images each; kept the first 4 of every class" in caplog.text


def test_tiered_npz(tmp_path):
    truth = _make_tiered(tmp_path / "tiered", npz=True)
    ds = tiered.load_tieredimagenet(
        str(tmp_path / "tiered"), str(tmp_path / "cache"), format="npz", classes_per_split=[6, 3, 4]
    )
    _check_tiered(ds, truth)
    flipped = tiered.load_tieredimagenet(
        str(tmp_path / "tiered"),
        str(tmp_path / "cache"),
        format="npz",
        classes_per_split=[6, 3, 4],
        npz_channel_order="bgr",
    )
    assert torch.equal(flipped.split("val").images, ds.split("val").images.flip(2))


def test_tiered_cache_reused_and_counts_checked(tmp_path, monkeypatch):
    _make_tiered(tmp_path / "tiered")
    first = tiered.load_tieredimagenet(
        str(tmp_path / "tiered"), str(tmp_path / "cache"), classes_per_split=[6, 3, 4], image_size=32
    )
    monkeypatch.setattr(
        tiered, "_decode_split", lambda *a, **k: pytest.fail("decoded again instead of reading the cache")
    )
    second = tiered.load_tieredimagenet(
        str(tmp_path / "tiered"), str(tmp_path / "cache"), classes_per_split=[6, 3, 4], image_size=32
    )
    assert torch.equal(first.split("test").images, second.split("test").images)
    assert first.split("train").images.shape[-1] == 32
    with pytest.raises(
        DataError, match=r"train split has 6 classes, expected 351"
    ):  # the default counts, from the cache
        tiered.load_tieredimagenet(str(tmp_path / "tiered"), str(tmp_path / "cache"), image_size=32)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"train split has 6 classes, expected 351"):  # and before decoding
        tiered.load_tieredimagenet(str(tmp_path / "tiered"), str(tmp_path / "cache2"))
    assert not (tmp_path / "cache2").exists()


def test_tiered_missing_message(tmp_path):
    root = tmp_path / "tiered"
    with pytest.raises(DataError) as e:
        tiered.load_tieredimagenet(str(root), str(tmp_path / "c"), url=None)
    msg = str(e.value)
    assert "\n" not in msg
    for s in SPLITS:
        assert str(root / f"{s}_images_png.pkl") in msg and str(root / f"{s}_labels.pkl") in msg
    with pytest.raises(DataError) as e:
        tiered.load_tieredimagenet(str(root), str(tmp_path / "c"), url="file:///nonexistent/tiered.tar")
    assert "file:///nonexistent/tiered.tar" in str(e.value)


# --------------------------------------------------------------------------------------------- malicious pickles


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    for obj in (_Evil(marker), {"image_data": np.zeros(3, np.uint8), "class_dict": {"n1": [_Evil(marker)]}}):
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DataError, match=r"refusing to load .*(posix|os)\.system"):
            restricted_load(path, "test")
        assert not marker.exists()
    # globals that would let a pickle reach code indirectly are refused too
    for module, name in (
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "fromstring"),
    ):
        path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00.")
        with pytest.raises(DataError, match="refusing"):
            restricted_load(path, "test")
    path.write_bytes(pickle.dumps({"x": np.arange(5), "y": [np.int64(3)], "z": b"raw"}, protocol=2))
    got = restricted_load(path, "test")
    assert got["x"].tolist() == list(range(5)) and got["z"] == b"raw"


def test_codecs_encode_limited_to_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(
        b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    )
    with pytest.raises(DataError, match="refusing"):
        restricted_load(path, "test")


@pytest.mark.parametrize("dataset", ["miniimagenet", "cifar", "tiered"])
def test_loaders_refuse_malicious_pickles(tmp_path, dataset):
    marker = tmp_path / "pwned"
    root = tmp_path / "root"
    root.mkdir()
    evil = pickle.dumps(_Evil(marker))
    if dataset == "miniimagenet":
        for n in miniimagenet.PICKLE_NAMES.values():
            (root / n).write_bytes(evil)
        call = lambda: miniimagenet.load_miniimagenet(str(root), str(tmp_path / "c"), split_dir=None)  # noqa: E731
    elif dataset == "cifar":
        (root / "cifar-100-python").mkdir()
        for n in cifar.CIFAR_FILES:
            (root / "cifar-100-python" / n).write_bytes(evil)
        call = lambda: cifar.load_fc100(str(root), str(tmp_path / "c"))  # noqa: E731
    else:
        for s in SPLITS:
            (root / f"{s}_labels.pkl").write_bytes(evil)
            (root / f"{s}_images_png.pkl").write_bytes(evil)
        call = lambda: tiered.load_tieredimagenet(str(root), str(tmp_path / "c"))  # noqa: E731
    with pytest.raises(DataError, match="refusing to load"):
        call()
    assert not marker.exists()
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.pt"))


# --------------------------------------------------------------------------------------------- Hydra configs


def test_miniimagenet_yaml_instantiates(compose_cfg, mini_pickle_root, ravi_dir, tmp_path):
    cfg = compose_cfg(
        "train",
        [
            "dataset=miniimagenet",
            f"dataset.root={mini_pickle_root}",
            f"cache_dir={tmp_path / 'cache'}",
            f"dataset.split_dir={ravi_dir}",
            "dataset.images_per_class=6",
        ],
    )
    assert (
        cfg.dataset.name == "miniimagenet"
        and cfg.dataset.format == "pickle"
        and cfg.dataset.cache_dir == str(tmp_path / "cache")
    )
    ds = instantiate(_plain(cfg.dataset), _convert_="all")
    _assert_banks(ds, {"train": 64, "val": 16, "test": 20}, 6, 84)
    assert ds.mean == pytest.approx((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255))
    assert ds.std == pytest.approx((70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255))
    assert list((tmp_path / "cache").glob("miniimagenet_*.pt"))


def test_miniimagenet_yaml_defaults(compose_cfg, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", "/data")
    cfg = compose_cfg("train", ["dataset=miniimagenet"])
    assert cfg.dataset.root == "/data/miniimagenet" and cfg.dataset.split_dir == "/data/miniimagenet/splits/ravi"
    assert cfg.dataset.url is None and cfg.dataset.image_size == 84 and cfg.dataset.images_per_class == 600
    assert compose_cfg("train", ["dataset=tieredimagenet"]).dataset.root == "/data/tieredimagenet"
    assert compose_cfg("train", ["dataset=cifar_fs"]).dataset.split_dir == "/data/cifar-fs/splits"


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"])
def test_cifar_yaml_instantiates(compose_cfg, cifar_root, cifar_fs_dir, tmp_path, name):
    overrides = [
        f"dataset={name}",
        f"dataset.root={cifar_root}",
        f"cache_dir={tmp_path / 'cache'}",
        "dataset.images_per_class=6",
    ]
    if name == "cifar_fs":
        overrides.append(f"dataset.split_dir={cifar_fs_dir}")
    cfg = compose_cfg("train", overrides)
    ds = instantiate(_plain(cfg.dataset), _convert_="all")
    counts = {"train": 64, "val": 16, "test": 20} if name == "cifar_fs" else {"train": 60, "val": 20, "test": 20}
    _assert_banks(ds, counts, 6, 32)
    assert ds.name == name
    assert ds.mean == pytest.approx((129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255))
    assert ds.std == pytest.approx((68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255))


def test_tiered_yaml_instantiates(compose_cfg, tmp_path):
    truth = _make_tiered(tmp_path / "tiered")
    cfg = compose_cfg(
        "train",
        [
            "dataset=tieredimagenet",
            f"dataset.root={tmp_path / 'tiered'}",
            f"cache_dir={tmp_path / 'cache'}",
            "dataset.classes_per_split=[6,3,4]",
        ],
    )
    ds = instantiate(_plain(cfg.dataset), _convert_="all")
    _check_tiered(ds, truth)
    assert ds.mean == pytest.approx((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255))


@pytest.mark.parametrize("override", ["dataset.fromat=csv", "dataset.images_per_class=many"])
def test_yaml_typos_fail(compose_cfg, override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["dataset=miniimagenet", override])
