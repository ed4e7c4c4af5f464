"""Hostile archives are bounded in members, names and headers as they are in bytes (issue 21).

An archive of millions of empty members, of absurdly deep or long names, or of
extended headers that tarfile would read whole (or by recursion) is refused
with an UnsafeArchiveError naming the handle, and leaves nothing in the cache:
no module dir, no ``.tmp`` dir, no lock. Tried on the pure extractor, through
the hub from a real HTTP server and from a local archive (asyncio and trio),
the sync Hub, and the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from asynchub import AsyncHub, Hub, Retries, UnsafeArchiveError, _archive
from asynchub._config import HubConfig
from asynchub._workers.wire import config_line, read_config
from tests._archives import (
    header_bomb_tar,
    long_name_tar,
    make_module,
    many_members_tar,
    tar_bytes,
    tree,
)
from tests._httpserver import Server

REPO = Path(__file__).resolve().parents[1]
FAST = Retries(total=2, backoff=0.01, max_backoff=0.02)
DEFAULT_MEMBERS = 100_000


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


def listing(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def pull_from(data: bytes, size: int = 64 * 1024):  # type: ignore[no-untyped-def]
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return lambda: chunks.pop(0) if chunks else b""


@pytest.fixture(scope="module")
def too_many() -> bytes:
    """saved_model.pb and 100,000 more members: one over the default bound."""
    return many_members_tar(DEFAULT_MEMBERS)


#: Archives of hostile names and headers, and what the refusal says.
HOSTILE = {
    "deep": (lambda: long_name_tar("deep"), "levels deep"),
    "long-component": (lambda: long_name_tar("component"), "name of 300 bytes"),
    "long-path": (lambda: long_name_tar("path"), "path of 4,039 bytes"),
    "long-name-header": (lambda: header_bomb_tar("longname"), "GNU long name of"),
    "pax-header": (lambda: header_bomb_tar("pax"), "pax header of"),
    "header-chain": (lambda: header_bomb_tar("chain"), "extended headers in a row"),
    "global-header-chain": (lambda: header_bomb_tar("global"), "extended headers in a row"),
}


# -- the extractor -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "file", "nested"])
def test_members_past_the_limit_are_refused(tmp_path: Path, kind: str) -> None:
    data = many_members_tar(40, kind=kind)  # 41 members, with saved_model.pb
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="more than 40 members"):
        _archive.extract(pull_from(data), dest, limit=10**9, max_members=40)
    ok = tmp_path / "ok"
    ok.mkdir()
    manifest = _archive.extract(pull_from(data), ok, limit=10**9, max_members=41)
    assert "saved_model.pb" in manifest.files


def test_the_default_member_limit_applies(tmp_path: Path, too_many: bytes) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="more than 100,000 members"):
        _archive.extract(pull_from(too_many), dest, limit=10**9)


def test_every_member_counts_the_root_and_directories_too(tmp_path: Path) -> None:
    src = make_module(tmp_path / "src", weights=100)
    data = tar_bytes(src)  # ".", saved_model.pb, variables/ and 2 files, assets/ and 1 file
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        count = len(t.getmembers())
    assert count == 7
    for limit, fails in ((count, False), (count - 1, True)):
        dest = tmp_path / f"dest{limit}"
        dest.mkdir()
        if fails:
            with pytest.raises(UnsafeArchiveError, match=f"more than {limit} members"):
                _archive.extract(pull_from(data), dest, limit=10**9, max_members=limit)
        else:
            _archive.extract(pull_from(data), dest, limit=10**9, max_members=limit)
            assert tree(dest) == tree(src)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_names_and_headers_are_refused_by_the_extractor(tmp_path: Path, kind: str) -> None:
    make, words = HOSTILE[kind]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError) as ei:
        _archive.extract(pull_from(make()), dest, limit=10**9)
    assert words in str(ei.value)


def test_names_within_the_bounds_still_extract(tmp_path: Path) -> None:
    data = many_members_tar(60, kind="nested")  # 60 levels: within 64
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _archive.extract(pull_from(data), dest, limit=10**9)
    assert len(manifest.dirs) == 60 and (dest / Path(*["d"] * 60)).is_dir()
    info = tarfile.TarInfo("variables/" + "n" * 255)
    info.size = 1
    assert _archive.check_member(info, extracted=0, limit=10) == "variables/" + "n" * 255


@pytest.mark.parametrize("kind", ["gnu", "pax-1.0"])
def test_sparse_members_are_refused_before_their_map_is_read(tmp_path: Path, kind: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
        t.addfile(tarfile.TarInfo("saved_model.pb"), io.BytesIO(b""))
        info = tarfile.TarInfo("variables/sparse")
        if kind == "gnu":
            info.type = tarfile.GNUTYPE_SPARSE
        else:
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
        info.size = 512
        t.addfile(info, io.BytesIO(b"1\n0\n512\n".ljust(512, b"\0")))
    data = buf.getvalue()
    if kind == "pax-1.0":  # GNU_FORMAT writes pax headers only in PAX_FORMAT
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as t:
            t.addfile(tarfile.TarInfo("saved_model.pb"), io.BytesIO(b""))
            t.addfile(info, io.BytesIO(b"1\n0\n512\n".ljust(512, b"\0")))
        data = buf.getvalue()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        _archive.extract(pull_from(data), dest, limit=10**9)


# -- through the hub: a real server and a local archive, asyncio and trio ----------------


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["url", "local"])
async def test_the_hub_refuses_too_many_members_and_leaves_nothing(
    server: Server, cache_dir: Path, tmp_path: Path, too_many: bytes, where: str
) -> None:
    if where == "url":
        handle = server.add("/many", body=too_many)
    else:
        handle = str(tmp_path / "many.tar.gz")
        Path(handle).write_bytes(too_many)
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as h:
        with pytest.raises(UnsafeArchiveError, match="more than 100,000 members") as ei:
            await h.resolve(handle)
    assert handle in str(ei.value) and ei.value.handle == handle
    assert listing(cache_dir) == []
    if where == "url":
        assert len(server.gets("/many")) == 1  # an unsafe archive is not retried


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_the_hub_refuses_hostile_names_and_headers(
    server: Server, cache_dir: Path, kind: str
) -> None:
    make, words = HOSTILE[kind]
    url = server.add("/hostile", body=make())
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as h:
        with pytest.raises(UnsafeArchiveError) as ei:
            await h.resolve(url)
    assert words in str(ei.value) and url in str(ei.value)
    assert listing(cache_dir) == []
    assert len(server.gets("/hostile")) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["url", "local"])
async def test_a_configured_member_limit_is_honoured(
    server: Server, cache_dir: Path, tmp_path: Path, where: str
) -> None:
    data = many_members_tar(60, kind="file")
    if where == "url":
        handle = server.add("/m", body=data)
    else:
        handle = str(tmp_path / "m.tar.gz")
        Path(handle).write_bytes(data)
    async with AsyncHub(cache_dir=cache_dir, retries=FAST, max_extract_members=50) as h:
        assert h.config.max_extract_members == 50
        with pytest.raises(UnsafeArchiveError, match="more than 50 members"):
            await h.resolve(handle)
    assert listing(cache_dir) == []
    async with AsyncHub(cache_dir=cache_dir, retries=FAST, max_extract_members=61) as h:
        path = await h.resolve(handle)
    assert len(tree(path)) == 61


def test_the_sync_hub_honours_the_variable(
    server: Server, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m", body=many_members_tar(60, kind="dir"))
    monkeypatch.setenv("ASYNCHUB_MAX_EXTRACT_MEMBERS", "50")
    with Hub(cache_dir=cache_dir, retries=FAST) as h:
        assert h.config.max_extract_members == 50
        with pytest.raises(UnsafeArchiveError, match="more than 50 members"):
            h.resolve(url)
    assert listing(cache_dir) == []


def test_the_command_line_reports_too_many_members(
    server: Server, cache_dir: Path, too_many: bytes
) -> None:
    url = server.add("/many", body=too_many)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TFHUB_DOWNLOAD_PROGRESS", None)
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "asynchub",
            "prefetch",
            "--cache-dir",
            str(cache_dir),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert f"{url}: " in done.stderr and "more than 100,000 members" in done.stderr
    assert "Traceback" not in done.stderr
    assert listing(cache_dir) == []


# -- the option ---------------------------------------------------------------------------


def test_the_member_limit_is_an_option_that_reaches_worker_processes() -> None:
    config = HubConfig.from_env(cache_dir="/c", max_extract_members=7)
    assert config.max_extract_members == 7
    assert HubConfig.from_env(cache_dir="/c").max_extract_members == DEFAULT_MEMBERS
    assert HubConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    child, _ = read_config(config_line(config, 2, events=False))
    assert child == dataclasses.replace(config, max_concurrency=2, progress=False)
    assert "max_extract_members" in HubConfig.options()
