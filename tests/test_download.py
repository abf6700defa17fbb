"""Downloads (local HTTP server, fake zips), content checks of local zips, and zip-slip refusal."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from fewshot.data import omniglot as og
from fewshot.data.base import DataError
from fewshot.data.io import download_file, safe_extract
from fewshot.data.omniglot import download_omniglot, load_omniglot


def _png() -> bytes:
    """A 105x105 1-bit drawing like Omniglot's: white page, one black stroke."""
    im = Image.new("1", (105, 105), 1)
    for x in range(20, 80):
        im.putpixel((x, 50), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _fake_zip(
    top: str, alphabets: list[str], chars: int = 2, drawings: int = 20, extra: dict[str, bytes] | None = None
) -> bytes:
    """A zip in Omniglot's layout, top/<Alphabet>/characterNN/IIII_DD.png, far too small to pass the content check."""
    png, buf, cid = _png(), io.BytesIO(), 0
    with zipfile.ZipFile(buf, "w") as zf:
        for alphabet in alphabets:
            for c in range(1, chars + 1):
                cid += 1
                for d in range(1, drawings + 1):
                    zf.writestr(f"{top}/{alphabet}/character{c:02d}/{cid:04d}_{d:02d}.png", png)
        for name, data in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_zips() -> dict[str, bytes]:
    return {
        "images_background.zip": _fake_zip("images_background", ["Alpha", "Beta"]),
        "images_evaluation.zip": _fake_zip("images_evaluation", ["Gamma"]),
    }


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment must not intercept requests to the local test server.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class _Handler(BaseHTTPRequestHandler):
    """Serves server.routes: path -> (body, mode); mode 'full', 'truncate' (Content-Length then half the body)
    or 'drop' (no Content-Length, half the body, then the connection closes)."""

    def do_GET(self):  # noqa: N802 (http.server API)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        body, mode = route
        self.send_response(200)
        if mode in ("full", "truncate"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if mode == "full" else body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.routes = {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _serve_zips(server, zips: dict[str, bytes], mode: str = "full") -> str:
    for name, body in zips.items():
        server.routes[f"/og/{name}"] = (body, mode)
    return f"{server.url}/og"


@pytest.fixture
def fake_md5(monkeypatch, fake_zips):
    """Accept the fake zips as 'official' downloads."""
    monkeypatch.setattr(og, "OFFICIAL_MD5", {n: hashlib.md5(b).hexdigest() for n, b in fake_zips.items()})


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/og"


def test_download_success(server, fake_zips, fake_md5, tmp_path):
    root = tmp_path / "omniglot"
    paths = download_omniglot(root, _serve_zips(server, fake_zips))
    assert paths == [root / n for n in og.ZIP_NAMES]
    for name, body in fake_zips.items():
        assert (root / name).read_bytes() == body
    assert sorted(p.name for p in root.iterdir()) == sorted(og.ZIP_NAMES)  # no temp files left


def test_load_downloads_then_checks_content(server, fake_zips, fake_md5, tmp_path):
    root, cache = tmp_path / "omniglot", tmp_path / "cache"
    with pytest.raises(
        DataError, match=r"hold 6 characters in 3 alphabets.*expected 1623 characters in 50 alphabets"
    ) as info:
        load_omniglot(str(root), str(cache), base_url=_serve_zips(server, fake_zips))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == sorted(og.ZIP_NAMES)
    assert not cache.exists() or not any(cache.iterdir())


def test_md5_mismatch_leaves_nothing(server, fake_zips, tmp_path):
    root = tmp_path / "omniglot"
    with pytest.raises(DataError) as info:
        load_omniglot(str(root), str(tmp_path / "cache"), base_url=_serve_zips(server, fake_zips))
    msg = str(info.value)
    got = hashlib.md5(fake_zips["images_background.zip"]).hexdigest()
    assert (
        "md5" in msg
        and "images_background.zip" in msg
        and og.OFFICIAL_MD5["images_background.zip"] in msg
        and got in msg
    )
    assert list(root.iterdir()) == []


def test_connection_refused_names_paths_and_urls(tmp_path):
    root, url = tmp_path / "omniglot", _closed_port_url()
    with pytest.raises(DataError) as info:
        load_omniglot(str(root), str(tmp_path / "cache"), base_url=url)
    msg = str(info.value)
    assert "\n" not in msg
    for name in og.ZIP_NAMES:
        assert str(root / name) in msg and f"{url}/{name}" in msg
    assert list(root.iterdir()) == []


def test_http_error(server, tmp_path):
    with pytest.raises(DataError, match=r"HTTP 404.*put that file at"):
        download_file(f"{server.url}/missing.txt", tmp_path / "x.txt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_body_leaves_nothing(server, fake_zips, tmp_path):
    body = fake_zips["images_background.zip"]
    server.routes["/cut"] = (body, "truncate")
    with pytest.raises(DataError, match=rf"closed after {len(body) // 2} of {len(body)} bytes"):
        download_file(f"{server.url}/cut", tmp_path / "cut.zip")  # no md5: the length check must catch it
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_leaves_nothing(server, fake_zips, fake_md5, tmp_path):
    root = tmp_path / "omniglot"
    with pytest.raises(DataError, match="md5"):
        download_omniglot(root, _serve_zips(server, fake_zips, mode="drop"))
    assert list(root.iterdir()) == []


def test_interrupted_download_leaves_nothing(server, fake_zips, tmp_path, monkeypatch):
    server.routes["/big"] = (fake_zips["images_background.zip"], "full")
    real_urlopen = urllib.request.urlopen

    class Interrupting:
        def __init__(self, resp):
            self.resp, self.headers, self.reads = resp, resp.headers, 0

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return self.resp.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.resp.close()

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Interrupting(real_urlopen(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        download_file(f"{server.url}/big", tmp_path / "big.zip")
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"cannot write to .*sub \(.*\); make it writable or put x.zip there by hand"):
        download_file("http://127.0.0.1:9/x", blocker / "sub" / "x.zip")


def test_local_zips_checked_by_content_not_md5(fake_zips, tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    for name, body in fake_zips.items():
        (root / name).write_bytes(body)  # md5 differs from the official one: must not matter for local files
    with pytest.raises(DataError, match=r"hold 6 characters in 3 alphabets") as info:
        load_omniglot(str(root), str(tmp_path / "cache"), download=False)
    assert "md5" not in str(info.value)

    # 21 drawings for one character (e.g. a duplicate folder across the two zips) is caught too.
    (root / "images_evaluation.zip").write_bytes(_fake_zip("images_evaluation", ["Gamma"], drawings=21))
    with pytest.raises(DataError, match=r"2 of them without 20 drawings \(e\.g\. Gamma/character01 has 21\)"):
        load_omniglot(str(root), str(tmp_path / "cache"), download=False)


def test_not_a_zip(tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    for name in og.ZIP_NAMES:
        (root / name).write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match=r"not a readable zip"):
        load_omniglot(str(root), str(tmp_path / "cache"), download=False)


@pytest.mark.parametrize("evil", ["../evil.txt", "images_background/../../evil.txt", "/tmp/fewshot_evil.txt"])
def test_safe_extract_refuses_escaping_entries(tmp_path, evil):
    zpath = tmp_path / "evil.zip"
    zpath.write_bytes(_fake_zip("images_background", ["Alpha"], chars=1, drawings=1, extra={evil: b"pwned"}))
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="outside"):
        safe_extract(zpath, dest)
    assert not dest.exists()  # refused before writing anything
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/fewshot_evil.txt").exists()


def test_safe_extract_extracts_normal_zip(tmp_path, fake_zips):
    zpath = tmp_path / "ok.zip"
    zpath.write_bytes(fake_zips["images_evaluation.zip"])
    paths = safe_extract(zpath, tmp_path / "out")
    assert len(paths) == 40 and all(p.is_file() and (tmp_path / "out") in p.parents for p in paths)


def test_loader_refuses_escaping_entries(fake_zips, tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    (root / "images_background.zip").write_bytes(
        _fake_zip("images_background", ["Alpha"], extra={"../evil.txt": b"pwned"})
    )
    (root / "images_evaluation.zip").write_bytes(fake_zips["images_evaluation.zip"])
    with pytest.raises(DataError, match=r"'\.\./evil\.txt' that points outside"):
        load_omniglot(str(root), str(tmp_path / "cache"), download=False)
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.omniglot
def test_vinyals_split_files_downloaded(server, omniglot_root, omniglot_cache_dir, omniglot_28, tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    for name in og.ZIP_NAMES:
        (root / name).symlink_to(omniglot_root / name)
    splits_url = _closed_port_url()
    with pytest.raises(DataError) as info:
        load_omniglot(str(root), str(omniglot_cache_dir), split="vinyals", splits_url=splits_url)
    assert str(root / "splits" / "vinyals" / "train.txt") in str(info.value) and f"{splits_url}/train.txt" in str(
        info.value
    )

    for name in og.VINYALS_FILES:
        server.routes[f"/splits/{name}"] = ((omniglot_root / "splits" / "vinyals" / name).read_bytes(), "full")
    ds = load_omniglot(str(root), str(omniglot_cache_dir), split="vinyals", splits_url=f"{server.url}/splits")
    assert [ds.split(s).num_classes for s in ("train", "val", "test")] == [4112, 688, 1692]
    folder = root / "splits" / "vinyals"
    assert sorted(p.name for p in folder.iterdir()) == sorted(og.VINYALS_FILES)
    for name in og.VINYALS_FILES:
        assert (folder / name).read_bytes() == (omniglot_root / "splits" / "vinyals" / name).read_bytes()


def test_data_root_finder_skips_or_fails_in_ci(tmp_path, monkeypatch):
    import conftest_data

    monkeypatch.setattr(conftest_data, "REPO_ROOT", tmp_path / "repo")  # no ../shared/data next to it
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FEWSHOT_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Omniglot zips"):
        conftest_data.require_omniglot_root()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set and the Omniglot zips .* missing"):
        conftest_data.require_omniglot_root()

    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    for name in og.ZIP_NAMES:
        (tmp_path / "data" / "omniglot" / name).write_bytes(b"")
    assert conftest_data.require_omniglot_root() == (tmp_path / "data" / "omniglot").resolve()
