"""s3:// and gs:// handles against real servers on 127.0.0.1 (moto, fake-gcs-server).

Every async test runs on asyncio (obstore's native async API) and on trio
(obstore's blocking calls in worker threads).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

import asynchub
from asynchub import AsyncHub, HandleError, HTTPStatusError, Hub, NetworkError, ProgressKind
from asynchub._handles import HandleKind, cache_key, parse
from asynchub._sources import objstore
from tests._archives import make_module, tar_bytes, tree
from tests._objstores import CuttingProxy, GcsServer, S3Server

pytestmark = pytest.mark.anyio

FAST = asynchub.Retries(total=2, backoff=0.01, max_backoff=0.05)


def hub(cache_dir: Path, **kwargs: Any) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)


def leftovers(cache_dir: Path) -> list[str]:
    """Download dirs and locks left in the cache dir (there must be none)."""
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if p.name.endswith((".tmp", ".lock")))


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "module-src")


# -- parsing (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handle", "kind", "url"),
    [
        ("s3://models/m/1.tar.gz", HandleKind.OBJECT, "s3://models/m/1.tar.gz"),
        ("gs://models/m.tgz", HandleKind.OBJECT, "gs://models/m.tgz"),
        ("s3://models/m/1/", HandleKind.PREFIX, "s3://models/m/1/"),
        ("gs://models/m/1", HandleKind.PREFIX, "gs://models/m/1/"),
        ("S3://models/m.tar", HandleKind.OBJECT, "s3://models/m.tar"),
    ],
)
def test_object_handles_parse(handle: str, kind: HandleKind, url: str) -> None:
    parsed = parse(handle)
    assert (parsed.kind, parsed.url) == (kind, url)
    assert parsed.key == cache_key(handle)  # tensorflow_hub's key: sha1 of the handle


@pytest.mark.parametrize(
    ("handle", "message"),
    [
        ("s3://Bad_Bucket/m.tar.gz", "no valid bucket"),
        ("s3:///m.tar.gz", "no valid bucket"),
        ("gs://ab/m.tar.gz", "no valid bucket"),
        ("s3://models/a//m.tar.gz", "empty, '.' or '..'"),
        ("gs://models/a/../m.tar.gz", "empty, '.' or '..'"),
    ],
)
def test_bad_object_handles(handle: str, message: str) -> None:
    with pytest.raises(HandleError, match=message) as info:
        parse(handle)
    assert info.value.handle == handle


def test_storage_emulator_host_is_translated_for_gcs() -> None:
    assert objstore.gcs_emulator({"STORAGE_EMULATOR_HOST": "127.0.0.1:9"}) == {
        "base_url": "http://127.0.0.1:9",
        "skip_signature": True,
        "allow_http": True,
    }
    both = {"STORAGE_EMULATOR_HOST": "h:1", "GOOGLE_BASE_URL": "http://x"}
    assert objstore.gcs_emulator(both) == {}  # obstore's own variable wins
    assert objstore.client_env("s3", {"AWS_ALLOW_HTTP": "true", "AWS_REGION": "x"}) == {
        "allow_http": "true"
    }


# -- s3:// against moto -----------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
async def test_s3_archive_object(s3: S3Server, cache_dir: Path, module: Path, gz: bool) -> None:
    body = tar_bytes(module, gz=gz)
    bucket = s3.bucket()
    handle = s3.put(bucket, "models/m/1.tar.gz" if gz else "models/m/1.tar", body)
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        path = await h.resolve(handle)
        assert await h.resolve(handle) == path  # a hit
    assert path == cache_dir / cache_key(handle)
    assert tree(path) == tree(module)
    record = json.loads((cache_dir / f"{cache_key(handle)}.manifest.json").read_text())
    assert record["sha256"] == hashlib.sha256(body).hexdigest()
    assert record["archive_bytes"] == len(body)
    kinds = [e.kind for e in events]
    assert ProgressKind.DOWNLOADING in kinds and kinds[-1] is ProgressKind.CACHED
    assert max(e.total or 0 for e in events) == len(body)


async def test_s3_prefix_is_copied_file_by_file(
    s3: S3Server, cache_dir: Path, module: Path
) -> None:
    bucket = s3.bucket()
    handle = s3.put_tree(bucket, "unpacked/m/1/", module)
    s3.put(bucket, "unpacked/m/10/saved_model.pb", b"not this one")  # a sibling prefix
    async with hub(cache_dir) as h:
        path = await h.resolve(handle)
    assert tree(path) == tree(module)
    record = json.loads((cache_dir / f"{cache_key(handle)}.manifest.json").read_text())
    assert record["sha256"] is None  # no archive; the content digest stands in
    assert set(record["file_sha256"]) == set(tree(module))
    assert len(record["tree_sha256"]) == 64
    assert leftovers(cache_dir) == []


async def test_s3_prefix_with_unsafe_key_is_refused(s3: S3Server, cache_dir: Path) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "m/saved_model.pb", b"pb")
    s3.put(bucket, "m/variables", b"a file where a directory must be")
    s3.put(bucket, "m/variables/variables.index", b"x")
    async with hub(cache_dir) as h:
        with pytest.raises(asynchub.UnsafeArchiveError, match=r"clashes|below"):
            await h.resolve(f"s3://{bucket}/m/")
    assert entries(cache_dir) == []


async def test_s3_missing_object_is_a_404_naming_the_handle(s3: S3Server, cache_dir: Path) -> None:
    bucket = s3.bucket()
    handle = f"s3://{bucket}/no/such.tar.gz"
    async with hub(cache_dir) as h:
        with pytest.raises(HTTPStatusError, match="no such object") as info:
            await h.resolve(handle)
    assert info.value.status == 404 and info.value.handle == handle
    assert handle in str(info.value)
    assert entries(cache_dir) == []


@pytest.mark.parametrize("key", ["m.tar.gz", "prefix/"])
async def test_s3_missing_bucket_is_a_404(s3: S3Server, cache_dir: Path, key: str) -> None:
    handle = f"s3://no-such-bucket-here/{key}"
    async with hub(cache_dir) as h:
        with pytest.raises(HTTPStatusError, match="no such bucket") as info:
            await h.resolve(handle)
    assert info.value.status == 404 and info.value.handle == handle
    assert entries(cache_dir) == []


async def test_s3_empty_prefix_is_a_404(s3: S3Server, cache_dir: Path) -> None:
    bucket = s3.bucket()
    async with hub(cache_dir) as h:
        with pytest.raises(HTTPStatusError, match="no objects under"):
            await h.resolve(f"s3://{bucket}/nothing/here/")
    assert entries(cache_dir) == []


@pytest.mark.parametrize("how", ["environment", "s3_options"])
async def test_s3_bad_credentials_are_a_403(
    s3: S3Server,
    cache_dir: Path,
    module: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    options: dict[str, Any] = {}
    if how == "environment":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        options["s3_options"] = {"secret_access_key": "not-the-secret"}
    async with hub(cache_dir, **options) as h:
        with pytest.raises(HTTPStatusError, match="refused the credentials") as info:
            await h.resolve(handle)
    assert info.value.status == 403 and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "SignatureDoesNotMatch" in str(info.value)
    assert entries(cache_dir) == []


async def test_s3_options_in_code_point_at_the_server(
    s3: S3Server, cache_dir: Path, module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    for name in s3.env():
        monkeypatch.delenv(name)
    options = s3.options()
    async with hub(cache_dir, s3_options=options) as h:
        assert tree(await h.resolve(handle)) == tree(module)


async def test_s3_cut_stream_is_resumed_from_where_it_stopped(
    s3: S3Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "big", weights=3_000_000)
    body = tar_bytes(module)
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar.gz", body)
    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=2_200_000)  # past the first 1 MiB piece
    events: list[asynchub.ProgressEvent] = []
    try:
        async with hub(cache_dir, s3_options={"endpoint": proxy.url}, progress=events.append) as h:
            path = await h.resolve(handle)
    finally:
        proxy.close()
    assert tree(path) == tree(module)
    assert proxy.cut == 1 and proxy.connections >= 2
    resumed = [e for e in events if e.kind is ProgressKind.RETRYING]
    # Resumed inside the attempt (done > 0): not a fresh attempt from byte 0.
    assert resumed and all(e.done > 0 for e in resumed)
    record = json.loads((cache_dir / f"{cache_key(handle)}.manifest.json").read_text())
    assert record["sha256"] == hashlib.sha256(body).hexdigest()  # not spliced


async def test_s3_cut_stream_without_retries_leaves_nothing(
    s3: S3Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "big", weights=3_000_000)
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=1_000_000, cuts=10)
    try:
        async with hub(cache_dir, s3_options={"endpoint": proxy.url}, retries=0) as h:
            with pytest.raises(NetworkError, match=r"cut after|failed") as info:
                await h.resolve(handle)
    finally:
        proxy.close()
    assert info.value.handle == handle
    assert entries(cache_dir) == []


async def test_s3_prefix_object_deleted_midway(
    s3: S3Server, cache_dir: Path, module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object listed, then deleted before it is read: the attempt starts over."""
    bucket = s3.bucket()
    handle = s3.put_tree(bucket, "m/", module)
    listed = objstore.ObjectPrefix.list
    calls = 0

    async def list_then_delete(self: objstore.ObjectPrefix) -> objstore.Snapshot:
        nonlocal calls
        calls += 1
        files = await listed(self)
        if calls == 1:  # between the listing and the reads, on the real server
            s3.delete(bucket, "m/assets/vocab.txt")
        return files

    monkeypatch.setattr(objstore.ObjectPrefix, "list", list_then_delete)
    async with hub(cache_dir, retries=0) as h:
        with pytest.raises(HTTPStatusError, match="no such object") as info:
            await h.resolve(handle)
    assert info.value.handle == handle and "vocab.txt" in str(info.value)
    assert entries(cache_dir) == []

    # With retries the next attempt lists again and copies what is there now.
    s3.put(bucket, "m/assets/vocab.txt", b"back\n")
    calls = 0
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        path = await h.resolve(handle)
    assert calls == 2
    assert [e.attempt for e in events if e.kind is ProgressKind.RETRYING] == [1]
    assert not (path / "assets" / "vocab.txt").exists()
    assert leftovers(cache_dir) == []


@pytest.mark.parametrize("kind", ["object", "prefix"])
async def test_cancelled_s3_download_leaves_no_tmp_dir_or_lock(
    s3: S3Server, cache_dir: Path, tmp_path: Path, kind: str
) -> None:
    module = make_module(tmp_path / "big", weights=3_000_000)
    bucket = s3.bucket()
    if kind == "object":
        handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    else:
        handle = s3.put_tree(bucket, "m/", module)
    with anyio.CancelScope() as scope:

        def progress(event: asynchub.ProgressEvent) -> None:
            if event.kind is ProgressKind.DOWNLOADING:
                scope.cancel()

        async with hub(cache_dir, progress=progress) as h:
            await h.resolve(handle)
    assert scope.cancelled_caught
    assert leftovers(cache_dir) == []
    assert not (cache_dir / cache_key(handle)).exists()


def test_sync_hub_resolves_s3(s3: S3Server, cache_dir: Path, module: Path) -> None:
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    with Hub(cache_dir=cache_dir, backend="trio") as h:
        assert tree(h.resolve(handle)) == tree(module)
        assert h.resolve(handle) == cache_dir / cache_key(handle)


# -- gs:// against fake-gcs-server ----------------------------------------------------------


async def test_gs_archive_object_and_prefix(gcs: GcsServer, cache_dir: Path, module: Path) -> None:
    bucket = gcs.bucket()
    archive = gcs.put(bucket, "m/1.tar.gz", tar_bytes(module))
    prefix = gcs.put_tree(bucket, "unpacked/1/", module)
    async with hub(cache_dir) as h:
        assert tree(await h.resolve(archive)) == tree(module)
        assert tree(await h.resolve(prefix)) == tree(module)
    assert leftovers(cache_dir) == []


async def test_gs_missing_object_and_bucket(gcs: GcsServer, cache_dir: Path) -> None:
    bucket = gcs.bucket()
    async with hub(cache_dir) as h:
        with pytest.raises(HTTPStatusError, match="no such object") as info:
            await h.resolve(f"gs://{bucket}/none.tar.gz")
        assert info.value.status == 404
        with pytest.raises(HTTPStatusError, match="no such bucket"):
            await h.resolve("gs://no-such-bucket-here/m/")
    assert entries(cache_dir) == []


async def test_gs_via_storage_emulator_host(
    gcs: GcsServer, cache_dir: Path, module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = gcs.bucket()
    handle = gcs.put(bucket, "m.tar.gz", tar_bytes(module))
    for name in gcs.env():
        monkeypatch.delenv(name)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.base)
    async with hub(cache_dir) as h:
        assert tree(await h.resolve(handle)) == tree(module)
