"""Version names and half-copied archives under ROOT: the repository's rules, then the same
rules seen through the real app (downloads, pages, and ``serve --infer``)."""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from asynchub._pack import pack
from asynchub._serving import repository
from asynchub._serving.repository import (
    ModuleSource,
    is_whole,
    latest,
    locate,
    scan,
    version_key,
    version_number,
    versions,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from asynchub.server import InferOptions, create_app, serve_in_thread

COMPRESSED = {"tf-hub-format": "compressed"}
#: Version names that look like numbers to ``str.isdigit`` or ``int`` but are not ``[0-9]+``.
ODD = ["²", "\u0661\u0660", "+1", " 1", "1_0"]


def fake_module(path: Path, payload: bytes = b"graph") -> Path:
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(payload)
    return path


def settled(path: Path) -> Path:
    """Dates ``path`` a minute back, as a file copied long ago."""
    past = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(past, past))
    return path


# -- the rules, as plain functions ---------------------------------------------------------


def test_versions_are_ascii_digits() -> None:
    assert version_number("10") == 10
    assert version_number("01") == 1
    for odd in [*ODD, "", "beta", "1.0", "-1"]:
        assert version_number(odd) is None, odd
    sources = [ModuleSource("m", v, Path(), False) for v in ["10", "beta", "2", *ODD]]
    ordered = [s.version for s in sorted(sources, key=version_key)]
    assert ordered[:2] == ["2", "10"]
    assert sorted(ordered[2:]) == ordered[2:]  # the others by name, after the numbers
    assert latest(sources) == "10"
    assert latest([ModuleSource("m", v, Path(), False) for v in ODD]) == max(ODD)
    assert latest([]) is None


def test_odd_version_directories_are_listed_after_the_numbers(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    for version in ["1", "2", "01", *ODD]:
        fake_module(root / "m" / version)
    found = versions(root, "m")
    assert [s.version for s in found][:3] == ["01", "1", "2"]
    assert {s.version for s in found[3:]} == set(ODD)
    assert latest(found) == "2"
    assert [s.version for s in scan(root)] == [s.version for s in found]
    assert locate(root, "m", "²") is not None


def _archive_bytes(tmp_path: Path, payload: bytes) -> bytes:
    module = fake_module(tmp_path / f"src-{len(payload)}" / "1", payload)
    return pack(module, tmp_path / f"{len(payload)}.tar.gz").read_bytes()


def test_is_whole(tmp_path: Path) -> None:
    data = _archive_bytes(tmp_path, os.urandom(300_000))
    path = tmp_path / "a.tar.gz"
    for cut, whole in [(len(data), True), (len(data) - 1, False), (len(data) // 2, False)]:
        path.write_bytes(data[:cut])
        assert is_whole(path) is whole, cut
    path.write_bytes(data + bytes(512))  # zero padding after the stream, as gzip allows
    assert is_whole(path)
    path.write_bytes(data + data[:1000])  # a second member, half there
    assert not is_whole(path)
    corrupt = bytearray(data)
    corrupt[-8] ^= 1  # the CRC
    path.write_bytes(corrupt)
    assert not is_whole(path)
    tar = tmp_path / "plain.tar"
    tar.write_bytes(gzip.decompress(data))
    path.write_bytes(tar.read_bytes())  # a plain tar named .tar.gz: ends in zero blocks
    assert is_whole(path)
    path.write_bytes(tar.read_bytes()[:4096])
    assert not is_whole(path)


def test_a_finished_archive_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.tar.gz"
    path.write_bytes(_archive_bytes(tmp_path, b"x"))
    reads: list[int] = []
    real = repository._stream_is_whole

    def counting(f: object) -> bool:
        reads.append(1)
        return real(f)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "_stream_is_whole", counting)
    assert is_whole(path) and is_whole(path)
    assert len(reads) == 2  # just written: it may still change within the same mtime tick
    settled(path)
    assert is_whole(path) and is_whole(path) and is_whole(path)
    assert len(reads) == 3


def test_a_half_copied_archive_is_no_version(tmp_path: Path) -> None:
    root = tmp_path.resolve() / "root"
    data = _archive_bytes(tmp_path, os.urandom(100_000))
    (root / "m").mkdir(parents=True)
    (root / "m" / "1.tar.gz").write_bytes(data)
    (root / "m" / "2.tar.gz").write_bytes(data[: len(data) // 2])
    assert [s.version for s in versions(root, "m")] == ["1"]
    assert latest(versions(root, "m")) == "1"
    assert [s.id for s in scan(root)] == ["m/1"]
    assert locate(root, "m", "2") is None
    fake_module(root / "m" / "2")  # while the archive is copied, the directory serves
    assert locate(root, "m", "2") == ModuleSource("m", "2", root / "m" / "2", False)
    shutil.rmtree(root / "m" / "2")
    (root / "m" / "2.tar.gz").write_bytes(data)
    assert [s.version for s in versions(root, "m")] == ["1", "2"]
    assert latest(versions(root, "m")) == "2"


# -- through the app ---------------------------------------------------------------------------


@pytest.fixture
def odd_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for version in ["1", "2", *ODD]:
        fake_module(root / "m" / version)
    return root


def test_odd_versions_through_http(odd_root: Path) -> None:
    with serve_in_thread(create_app(odd_root)) as base, httpx.Client(base_url=base) as c:
        index = c.get("/")
        assert index.status_code == 200
        assert index.text.count("href='/m/2'") >= 1
        for version in ODD:
            page = c.get(f"/m/{quote(version)}")
            assert page.status_code == 200, version
            download = c.get(f"/m/{quote(version)}", params=COMPRESSED)
            assert download.status_code == 200, version
            assert download.content[:2] == b"\x1f\x8b"


def test_half_copied_archive_through_http(tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = _archive_bytes(tmp_path, os.urandom(100_000))
    (root / "m").mkdir(parents=True)
    (root / "m" / "1.tar.gz").write_bytes(data)
    (root / "m" / "2.tar.gz").write_bytes(data[: len(data) // 2])
    with serve_in_thread(create_app(root)) as base, httpx.Client(base_url=base) as c:
        index = c.get("/").text
        assert "href='/m/1'" in index
        assert "href='/m/2'" not in index
        assert c.get("/m/1", params=COMPRESSED).content == data
        for params in (COMPRESSED, {}):
            missing = c.get("/m/2", params=params)
            assert missing.status_code == 404
            assert "not whole yet" in missing.text
        (root / "m" / "2.tar.gz").write_bytes(data)
        assert "href='/m/2'" in c.get("/").text
        assert c.get("/m/2", params=COMPRESSED).content == data


# -- through serve --infer (TensorFlow) --------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorflow")
    from tests import _savedmodels

    tmp = tmp_path_factory.mktemp("versions")
    return _savedmodels.signatures_module(tmp / "model", ["serving_default"])


def _infer(c: httpx.Client, path: str) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    return c.post(path, json=body)


@pytest.mark.tf
def test_infer_with_odd_version_directories(saved_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for version in ["1", *ODD]:
        shutil.copytree(saved_model, root / "m" / version)
    app = create_app(root, infer=InferOptions(preload=True))
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        metadata = c.get("/v2/models/m")
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["versions"][0] == "1"
        assert set(metadata.json()["versions"]) == {"1", *ODD}
        answer = _infer(c, "/v2/models/m/infer")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1"
        assert c.get("/m/1").status_code == 200


@pytest.mark.tf
def test_infer_with_a_half_copied_archive(saved_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = pack(saved_model, tmp_path / "model.tar.gz").read_bytes()
    (root / "m").mkdir(parents=True)
    (root / "m" / "1.tar.gz").write_bytes(data)
    (root / "m" / "2.tar.gz").write_bytes(data[: len(data) // 2])
    app = create_app(root, cache_dir=tmp_path / "pack", infer=InferOptions())
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        for _ in range(2):  # the second time from what the first one loaded
            answer = _infer(c, "/v2/models/m/infer")
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == "1"
        assert c.get("/v2/models/m").json()["versions"] == ["1"]
        assert _infer(c, "/v2/models/m/versions/2/infer").status_code == 404
        (root / "m" / "2.tar.gz").write_bytes(data)
        deadline = time.monotonic() + 10  # the latest version is remembered for 2 s
        while (version := _infer(c, "/v2/models/m/infer").json()["model_version"]) == "1":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert version == "2"
        assert c.get("/v2/models/m").json()["versions"] == ["1", "2"]


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    """Each test starts with no remembered verdicts (inodes are reused across tests)."""
    repository._whole.clear()
