"""Omniglot loader on the real zips: content, preprocessing, splits, rotations and the decode cache.

The session decodes the real zips once (28x28, the omniglot_28 fixture); everything else reads the
session cache or fakes the decoder.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import torch

from fewshot.data import omniglot as og
from fewshot.data.base import DataError
from fewshot.data.omniglot import load_omniglot, load_omniglot_images, omniglot_cache_file

NAME_RE = re.compile(r"^[^/]+/character\d{2}$")


def _all_names(ds) -> list[str]:
    return [n for split in ("train", "val", "test") for n in ds.split(split).class_names]


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("Omniglot was decoded again instead of read from the cache")

    monkeypatch.setattr(og, "_decode_images", boom)
    monkeypatch.setattr(og, "_scan", boom)


@pytest.mark.omniglot
def test_counts_and_images(omniglot_28):
    ds = omniglot_28
    names = _all_names(ds)
    assert len(names) == len(set(names)) == 1623
    assert all(NAME_RE.match(n) for n in names)
    assert len({n.split("/")[0] for n in names}) == 50
    assert (ds.name, ds.channels, ds.image_size, ds.mean, ds.std) == ("omniglot", 1, 28, (0.0,), (1.0,))
    for split in ("train", "val", "test"):
        images = ds.split(split).images
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (20, 1, 28, 28)
    images = torch.cat([ds.split(s).images for s in ("train", "val", "test")])
    # Strokes bright (255) on a black background: mostly dark, corners empty, every drawing has ink.
    assert images.float().mean() < 64
    assert images.max() == 255
    assert (images[..., 0, 0] == 0).float().mean() > 0.99
    assert (images.flatten(2).amax(-1) > 128).all()


@pytest.mark.omniglot
def test_finn_split(omniglot_root, omniglot_cache_dir, omniglot_28):
    ds = omniglot_28
    train, val, test = (ds.split(s) for s in ("train", "val", "test"))
    assert (train.num_classes, val.num_classes, test.num_classes) == (1100, 100, 423)
    assert train.rotate and val.rotate and test.rotate
    assert not (
        set(train.class_names) & set(val.class_names)
        or set(train.class_names) & set(test.class_names)
        or set(val.class_names) & set(test.class_names)
    )

    # The documented recipe: sorted names, random.Random(seed).shuffle, then 1100 / 100 / 423.
    order = sorted(_all_names(ds))
    random.Random(1).shuffle(order)
    assert (
        train.class_names == order[:1100] and val.class_names == order[1100:1200] and test.class_names == order[1200:]
    )

    again = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="finn", split_seed=1, download=False)
    for s in ("train", "val", "test"):
        assert again.split(s).class_names == ds.split(s).class_names
        assert torch.equal(again.split(s).images, ds.split(s).images)
    other = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="finn", split_seed=2, download=False)
    assert other.split("train").class_names != train.class_names
    assert sorted(_all_names(other)) == sorted(_all_names(ds))


@pytest.mark.omniglot
def test_background_split_is_kochs(omniglot_root, omniglot_cache_dir, omniglot_28):
    """split=background: the 30 background alphabets train, the 20 evaluation alphabets (those of Lake's one-shot
    runs) are split 10 / 10 between validation and test, whole alphabets, no rotations."""
    ds = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="background", download=False)
    banks = [ds.split(s) for s in ("train", "val", "test")]
    alphabets = [{n.split("/")[0] for n in b.class_names} for b in banks]
    assert [b.num_classes for b in banks] == [964, 307, 352] and [len(a) for a in alphabets] == [30, 10, 10]
    assert not (alphabets[0] & alphabets[1] or alphabets[0] & alphabets[2] or alphabets[1] & alphabets[2])
    assert {"Latin", "Greek", "Korean"} <= alphabets[0] and not any(b.rotate for b in banks)
    assert alphabets[1] | alphabets[2] == {n.split("/")[0] for n in _all_names(ds)} - alphabets[0]


@pytest.mark.omniglot
def test_vinyals_split_and_rotations(omniglot_root, omniglot_cache_dir, omniglot_28):
    ds = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="vinyals", download=False)
    train, val, test = (ds.split(s) for s in ("train", "val", "test"))
    assert (train.num_classes, val.num_classes, test.num_classes) == (4112, 688, 1692)
    assert not (train.rotate or val.rotate or test.rotate)
    assert train.images.shape[1:] == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    sets = [set(b.class_names) for b in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    chars = [{n.rsplit("/", 1)[0] for n in s} for s in sets]
    assert [len(c) for c in chars] == [1028, 172, 423]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
    # Known quirk of the Vinyals files: Gurmukhi characters appear in both train and test (classes still disjoint).
    alphabets = [{c.split("/")[0] for c in cs} for cs in chars]
    assert "Gurmukhi" in alphabets[0] & alphabets[2]

    # Each rotDDD class is torch.rot90 (counter-clockwise) of its character's drawings.
    base, base_names = load_omniglot_images(omniglot_root, omniglot_cache_dir, 28)
    index = {n: i for i, n in enumerate(base_names)}
    for bank in (train, test):
        for ci in (0, 1, 2, 3, bank.num_classes - 1):
            name = bank.class_names[ci]
            char, rot = name.rsplit("/", 1)
            expected = torch.rot90(base[index[char]], int(rot[3:]) // 90, dims=(-2, -1))
            assert torch.equal(bank.images[ci], expected), name
    pos = {n: i for i, n in enumerate(train.class_names)}
    char = train.class_names[0].rsplit("/", 1)[0]
    r0, r90 = train.images[pos[f"{char}/rot000"]], train.images[pos[f"{char}/rot090"]]
    assert torch.equal(r90, torch.rot90(r0, 1, dims=(-2, -1)))
    assert not torch.equal(r90, r0)
    # Finn and Vinyals read the same decoded drawings.
    finn = {n: b.images[i] for b in omniglot_28.splits.values() for i, n in enumerate(b.class_names)}
    assert torch.equal(r0, finn[char])


@pytest.mark.omniglot
def test_cache_reused_without_decoding(omniglot_root, omniglot_cache_dir, omniglot_28, monkeypatch):
    cache = omniglot_cache_file(omniglot_root, omniglot_cache_dir, 28)
    assert cache.is_file()
    # Atomic writes leave no temp files behind.
    assert all(p.name.startswith("omniglot_") and p.suffix == ".pt" for p in omniglot_cache_dir.iterdir())
    _forbid_decoding(monkeypatch)
    start = time.perf_counter()
    warm = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="finn", download=False)
    seconds = time.perf_counter() - start
    assert seconds < 5, f"loading from the cache took {seconds:.1f}s"
    assert torch.equal(warm.split("test").images, omniglot_28.split("test").images)


@pytest.mark.omniglot
def test_preprocessing_matches_pillow_on_the_source_pngs(omniglot_root, omniglot_cache_dir, omniglot_28):
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    images, names = load_omniglot_images(omniglot_root, omniglot_cache_dir, 28)
    assert names == sorted(names)
    for ci, di in ((0, 0), (700, 19), (1622, 7)):
        alphabet, char = names[ci].split("/")
        found = None
        for zname in og.ZIP_NAMES:
            with zipfile.ZipFile(omniglot_root / zname) as zf:
                entries = sorted(
                    e for e in zf.namelist() if e.split("/")[1:3] == [alphabet, char] and e.endswith(".png")
                )
                if entries:
                    found = zf.read(entries[di])
                    assert entries[di].endswith(f"_{di + 1:02d}.png")
        assert found is not None, names[ci]
        page = Image.open(io.BytesIO(found))
        assert page.size == (105, 105)
        # Cache entry == Pillow Lanczos resize of the inverted drawing, in name / drawing order.
        expected = 255 - np.asarray(page.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
        assert np.array_equal(images[ci, di, 0].numpy(), expected)
        # 105 keeps the drawing as is: strokes (black in the PNG) become 255, the page 0.
        full = og.decode_drawing(found, 105)
        assert np.array_equal(full, np.where(np.asarray(page.convert("L")) > 0, 0, 255))
        small = og.decode_drawing(found, 14)
        assert small.shape == (14, 14) and small.max() > 128


@pytest.mark.omniglot
def test_image_size_change_and_stale_cache_rebuild(
    omniglot_root, omniglot_cache_dir, omniglot_28, tmp_path, monkeypatch
):
    # Work on a copy of the session cache: the decoder is faked here (a real decode costs ~10 s).
    cache28 = omniglot_cache_file(omniglot_root, omniglot_cache_dir, 28)
    (tmp_path / cache28.name).write_bytes(cache28.read_bytes())
    calls = []

    def fake_decode(zip_paths, members, image_size):
        calls.append(image_size)
        return torch.full((len(members), len(members[0]), 1, image_size, image_size), 7, dtype=torch.uint8)

    monkeypatch.setattr(og, "_decode_images", fake_decode)
    small = load_omniglot(str(omniglot_root), str(tmp_path), image_size=14, download=False)
    cache14 = omniglot_cache_file(omniglot_root, tmp_path, 14)
    # The 28x28 cache is not served for 14x14: a new decode, into its own file.
    assert calls == [14] and cache14.is_file() and cache14.name != cache28.name
    assert small.image_size == 14 and small.split("train").images.shape[1:] == (20, 1, 14, 14)
    assert small.split("train").class_names == omniglot_28.split("train").class_names
    assert load_omniglot(str(omniglot_root), str(tmp_path), image_size=28, download=False).image_size == 28
    assert calls == [14]  # the 28x28 copy is still used as is

    # A cache whose stored fingerprint does not match is stale: rebuilt.
    payload = torch.load(cache14, weights_only=True)
    payload["fingerprint"] = "0" * 16
    torch.save(payload, cache14)
    load_omniglot(str(omniglot_root), str(tmp_path), image_size=14, download=False)
    assert calls == [14, 14]
    assert torch.load(cache14, weights_only=True)["fingerprint"] == cache14.name[len("omniglot_") : -len(".pt")]

    # So is an unreadable (e.g. truncated) one; no temp files are left behind.
    cache14.write_bytes(cache14.read_bytes()[:1000])
    rebuilt = load_omniglot(str(omniglot_root), str(tmp_path), image_size=14, download=False)
    assert calls == [14, 14, 14] and int(rebuilt.split("val").images[0, 0, 0, 0, 0]) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache28.name, cache14.name])


def _root_with_real_zips(omniglot_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "omniglot"
    root.mkdir()
    for name in og.ZIP_NAMES:
        (root / name).symlink_to(omniglot_root / name)
    return root


@pytest.mark.omniglot
def test_vinyals_trainval_trains_on_the_1200_characters(omniglot_root, omniglot_cache_dir, omniglot_28):
    # Snell et al. (and Vinyals et al.) train on 1200 characters: trainval.txt, the train and val files together
    plain = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="vinyals", download=False)
    ds = load_omniglot(str(omniglot_root), str(omniglot_cache_dir), split="vinyals_trainval", download=False)
    train, val, test = (ds.split(s) for s in ("train", "val", "test"))
    assert (train.num_classes, val.num_classes, test.num_classes) == (4800, 688, 1692)
    assert set(train.class_names) == set(plain.split("train").class_names) | set(val.class_names)
    assert len({n.rsplit("/", 1)[0] for n in train.class_names}) == 1200
    assert test.class_names == plain.split("test").class_names and torch.equal(test.images, plain.split("test").images)
    pos = {n: i for i, n in enumerate(plain.split("train").class_names)}
    for ci in (0, 1, train.num_classes - 1):  # the same rotated drawings as the plain split's
        name = train.class_names[ci]
        other = plain.split("train") if name in pos else val
        j = pos[name] if name in pos else val.class_names.index(name)
        assert torch.equal(train.images[ci], other.images[j]), name


def test_vinyals_bad_files(omniglot_root, omniglot_cache_dir, omniglot_28, tmp_path):
    root = _root_with_real_zips(omniglot_root, tmp_path)
    with pytest.raises(DataError, match=r"splits/vinyals/train\.txt.*download=true"):
        load_omniglot(str(root), str(omniglot_cache_dir), split="vinyals", download=False)

    folder = root / "splits" / "vinyals"
    folder.mkdir(parents=True)
    for name in og.VINYALS_FILES:
        (folder / name).write_text((omniglot_root / "splits" / "vinyals" / name).read_text())
    (folder / "val.txt").write_text("Latin/character01/rot000\nKlingon/character99/rot090\n")
    with pytest.raises(DataError, match=r"val\.txt:2: unknown Omniglot character 'Klingon/character99'"):
        load_omniglot(str(root), str(omniglot_cache_dir), split="vinyals", download=False)
    (folder / "val.txt").write_text("Latin/character01/rot045\n")
    with pytest.raises(DataError, match=r"val\.txt:1: .*rotDDD"):
        load_omniglot(str(root), str(omniglot_cache_dir), split="vinyals", download=False)


def test_unknown_split_lists_choices(tmp_path):
    with pytest.raises(DataError, match=r"unknown Omniglot split 'lake'.*finn, vinyals"):
        load_omniglot(str(tmp_path), str(tmp_path / "cache"), split="lake")


def test_missing_zips_without_download(tmp_path):
    root = tmp_path / "omniglot"
    with pytest.raises(DataError) as info:
        load_omniglot(str(root), str(tmp_path / "cache"), download=False, base_url="https://example.org/og")
    msg = str(info.value)
    assert "\n" not in msg
    for name in og.ZIP_NAMES:
        assert str(root / name) in msg and f"https://example.org/og/{name}" in msg
    assert not root.exists()
