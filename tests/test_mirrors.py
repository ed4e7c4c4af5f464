"""Mirrors: push cached modules, fetch from the mirror first, fall back, and trust by digest.

Origins are the test HTTP server; mirrors are moto's S3, fake-gcs-server, a
local directory and an http server, all on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

import asynchub
from asynchub import AsyncHub, Hub, IntegrityError, ProgressKind
from asynchub._handles import cache_key
from asynchub.cli import main as cli_main
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server
from tests._objstores import GcsServer, S3Server
from tests.test_digests import checksum_server

FAST = asynchub.Retries(total=1, backoff=0.01, max_backoff=0.05)


def hub(cache_dir: Path, **kwargs: Any) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)


def record(cache_dir: Path, handle: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (cache_dir / f"{cache_key(handle)}.manifest.json").read_text()
    )
    return data


def names(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def packed(src: Path) -> bytes:
    out = src.parent / f"{src.name}.packed.tar.gz"
    asynchub.pack(src, out)
    return out.read_bytes()


def push(mirror: str, *handles: str, cache_dir: Path) -> list[str]:
    done = CliRunner().invoke(
        cli_main, ["mirror", "push", mirror, *handles, "-q", "--cache-dir", str(cache_dir)]
    )
    assert done.exit_code == 0, done.output
    return [line.split("\t")[0] for line in done.stdout.splitlines()]


def lock(*handles: str, cache_dir: Path, out: Path) -> Path:
    done = CliRunner().invoke(cli_main, ["lock", *handles, "-q", "--cache-dir", str(cache_dir)])
    assert done.exit_code == 0, done.output
    out.write_text(done.stdout)
    return out


async def apush(mirror: str, *handles: str, cache_dir: Path) -> list[str]:
    """:func:`push` from an async test: the command runs its own event loop, in a thread."""
    return await anyio.to_thread.run_sync(lambda: push(mirror, *handles, cache_dir=cache_dir))


async def alock(*handles: str, cache_dir: Path, out: Path) -> Path:
    return await anyio.to_thread.run_sync(lambda: lock(*handles, cache_dir=cache_dir, out=out))


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "m1")


@pytest.fixture
def other(tmp_path: Path) -> Path:
    return make_module(tmp_path / "m2", seed=9)


@pytest.mark.anyio
async def test_push_to_s3_then_fetch_from_the_mirror_not_the_origin(
    server: Server, s3: S3Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    bucket = s3.bucket()
    [where] = await apush(f"s3://{bucket}/mirror", url, cache_dir=cache_dir)
    key = cache_key(url)
    assert where == f"s3://{bucket}/mirror/{key}.tar.gz"
    assert s3.get(bucket, f"mirror/{key}.tar.gz") == packed(cache_dir / key)
    assert len(server.gets("/m/1")) == 1  # the push fetched it once

    fresh = tmp_path / "fresh"
    async with hub(fresh, mirrors=[f"s3://{bucket}/mirror/"]) as h:
        path = await h.resolve(url)
    assert tree(path) == tree(module)
    assert len(server.gets("/m/1")) == 1  # the origin was not asked
    assert record(fresh, url)["mirror"] == f"s3://{bucket}/mirror"


def test_local_dir_mirror_from_the_environment(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    push(str(mirror), url, cache_dir=cache_dir)
    assert [p.name for p in mirror.iterdir()] == [f"{cache_key(url)}.tar.gz"]
    monkeypatch.setenv("ASYNCHUB_MIRRORS", f"http://127.0.0.1:1/none, {mirror.as_uri()}")
    fresh = tmp_path / "fresh"
    with Hub(cache_dir=fresh, retries=0) as h:
        assert h.config.mirrors == ("http://127.0.0.1:1/none", mirror.as_uri())
        assert tree(h.resolve(url)) == tree(module)
    assert len(server.gets("/m/1")) == 1


@pytest.mark.anyio
async def test_miss_and_fault_fall_back_to_the_origin(
    server: Server, s3: S3Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    empty = s3.bucket()
    events: list[asynchub.ProgressEvent] = []
    mirrors = [f"s3://{empty}", "http://127.0.0.1:1/down"]  # a miss, then a fault
    async with hub(cache_dir, mirrors=mirrors, progress=events.append) as h:
        path = await h.resolve(url)
    assert tree(path) == tree(module)
    assert len(server.gets("/m/1")) == 1
    retried = [e for e in events if e.kind is ProgressKind.RETRYING]
    # The miss is quiet; the unreachable mirror is reported, once (no retries there).
    assert len(retried) == 1 and "127.0.0.1:1" in str(retried[0].error)
    assert "mirror" not in record(cache_dir, url)


@pytest.mark.anyio
async def test_http_mirror_gets_no_configured_headers(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    key = cache_key(url)
    server.add(f"/mirror/{key}.tar.gz", body=packed(module))
    headers = {"Authorization": "Bearer origin-only"}
    async with hub(cache_dir, mirrors=[server.url("/mirror")], headers=headers) as h:
        assert tree(await h.resolve(url)) == tree(module)
    [got] = server.gets(f"/mirror/{key}.tar.gz")
    assert "authorization" not in {k.lower() for k in got}
    assert server.gets("/m/1") == []


@pytest.mark.anyio
async def test_gs_mirror(server: Server, gcs: GcsServer, cache_dir: Path, module: Path) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    bucket = gcs.bucket()
    gcs.put(bucket, f"cache/{cache_key(url)}.tar.gz", packed(module))
    async with hub(cache_dir, mirrors=[f"gs://{bucket}/cache"]) as h:
        assert tree(await h.resolve(url)) == tree(module)
    assert server.gets("/m/1") == []


def tamper(s3: S3Server, bucket: str, key: str, module: Path) -> None:
    s3.put(bucket, f"{key}.tar.gz", packed(module))


@pytest.mark.anyio
async def test_lock_file_accepts_a_true_mirror_and_refuses_a_tampered_one(
    server: Server, s3: S3Server, cache_dir: Path, module: Path, other: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    bucket = s3.bucket()
    await apush(f"s3://{bucket}", url, cache_dir=cache_dir)
    lockfile = await alock(url, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    gets = len(server.gets("/m/1"))

    # The mirror's re-pack is other bytes than the origin's archive, but the same module.
    ok = tmp_path / "ok"
    async with hub(ok, mirrors=[f"s3://{bucket}"], lockfile=lockfile) as h:
        assert tree(await h.resolve(url)) == tree(module)
    assert record(ok, url)["mirror"] == f"s3://{bucket}"

    tamper(s3, bucket, cache_key(url), other)
    bad = tmp_path / "bad"
    async with hub(bad, mirrors=[f"s3://{bucket}"], lockfile=lockfile) as h:
        with pytest.raises(IntegrityError, match="content") as info:
            await h.resolve(url)
    assert info.value.handle == url and "lock file" in str(info.value)
    assert names(bad) == []  # nothing committed, no tmp dir, no lock
    assert len(server.gets("/m/1")) == gets  # the origin was not silently used

    # Only when asked: the origin stands in for a mirror that fails its pin.
    async with hub(bad, mirrors=[f"s3://{bucket}"], lockfile=lockfile,
                   on_mirror_mismatch="origin") as h:  # fmt: skip
        assert tree(await h.resolve(url)) == tree(module)
    assert len(server.gets("/m/1")) == gets + 1
    assert "mirror" not in record(bad, url)


@pytest.mark.anyio
async def test_fragment_pin_and_a_mirror(
    server: Server, s3: S3Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    """A bare archive digest trusts a mirror only with the very archive."""
    tarred = tar_bytes(module)  # not how pack writes it
    reproducible = packed(module)  # what mirror push writes
    assert tarred != reproducible
    bucket = s3.bucket()
    for name, body in (("tarred", tarred), ("packed", reproducible)):
        url = server.add(f"/{name}", body=body)
        await apush(f"s3://{bucket}", url, cache_dir=cache_dir)
        pinned = f"{url}#sha256={hashlib.sha256(body).hexdigest()}"
        fresh = tmp_path / f"fresh-{name}"
        async with hub(fresh, mirrors=[f"s3://{bucket}"]) as h:
            if name == "tarred":
                with pytest.raises(IntegrityError, match="archive"):
                    await h.resolve(pinned)
                assert names(fresh) == []
            else:
                # Packed the same way, the re-pack is byte for byte the origin's archive.
                assert tree(await h.resolve(pinned)) == tree(module)
                assert len(server.gets(f"/{name}")) == 1  # only the push's


def test_lock_ignores_a_mirrored_entry(
    server: Server, s3: S3Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    bucket = s3.bucket()
    push(f"s3://{bucket}", url, cache_dir=tmp_path / "pusher")
    with Hub(cache_dir=cache_dir, mirrors=[f"s3://{bucket}"]) as h:
        h.resolve(url)  # from the mirror: its record's sha256 is the re-pack's
    assert record(cache_dir, url)["sha256"] != hashlib.sha256(body).hexdigest()
    out = lock(url, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    entry = json.loads(out.read_text())["modules"][url]
    assert entry["sha256"] == hashlib.sha256(body).hexdigest()  # the origin's
    assert entry["size"] == len(body)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:1/mirror", "http://127.0.0.1:1/m"], "read-only"),
        (["/tmp/somewhere", "s3://bucket/m.tar.gz"], "http(s) handles only"),
        (["ftp://x/y", "http://127.0.0.1:1/m"], "expected s3://"),
    ],
)
def test_mirror_push_refusals(cache_dir: Path, args: list[str], message: str) -> None:
    done = CliRunner().invoke(
        cli_main, ["mirror", "push", *args, "-q", "--cache-dir", str(cache_dir)]
    )
    assert done.exit_code == 1
    assert message in done.stderr


@pytest.mark.anyio
async def test_mirror_whose_checksum_fails_is_a_fault(
    server: Server, cache_dir: Path, module: Path
) -> None:
    """A server checksum that disagrees is a broken copy, not a pin failure: on to the origin."""
    url = server.add("/m/1", body=tar_bytes(module))
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    events: list[asynchub.ProgressEvent] = []
    with checksum_server(packed(module), {"Content-MD5": wrong}) as (mirror_url, gets):
        base = mirror_url.rsplit("/", 1)[0]
        async with hub(cache_dir, mirrors=[base], progress=events.append) as h:
            assert tree(await h.resolve(url)) == tree(module)
    assert len(gets) == 1  # one attempt at a mirror
    assert len(server.gets("/m/1")) == 1
    [retried] = [e for e in events if e.kind is ProgressKind.RETRYING]
    assert isinstance(retried.error, IntegrityError) and "MD5" in str(retried.error)


@pytest.mark.anyio
async def test_worker_processes_get_mirrors_a_lock_file_and_object_store_options(
    server: Server,
    s3: S3Server,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """prefetch(processes=2) runs in its workers with every option of the hub's.

    The store's address and keys are given only as s3_options (the environment is
    emptied of AWS_*), the modules come from the mirror (the origin is not asked),
    and the lock file is enforced there: a tampered mirror copy is refused.
    """
    from asynchub._workers import parent

    modules = [make_module(tmp_path / f"src{i}", seed=i) for i in range(4)]
    urls = [server.add(f"/w/{i}", body=tar_bytes(m)) for i, m in enumerate(modules)]
    bucket = s3.bucket()
    await apush(f"s3://{bucket}", *urls, cache_dir=cache_dir)
    lockfile = await alock(*urls, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    tamper(s3, bucket, cache_key(urls[3]), make_module(tmp_path / "evil", seed=99))
    gets = [len(server.gets(f"/w/{i}")) for i in range(4)]
    options = s3.options()
    for name in s3.env():
        monkeypatch.delenv(name)
    spawned: list[int] = []
    spawn = parent._spawn

    async def counting() -> Any:
        process = await spawn()
        spawned.append(process.pid)
        return process

    monkeypatch.setattr(parent, "_spawn", counting)
    fresh = tmp_path / "fresh"
    async with hub(
        fresh, mirrors=[f"s3://{bucket}"], lockfile=lockfile, s3_options=options, retries=0
    ) as h:
        assert not h.in_process_only
        results = await h.prefetch(urls, processes=2, return_exceptions=True)
    assert len(spawned) == 2  # the downloads ran in two worker processes
    for i in range(3):
        assert results[i] == fresh / cache_key(urls[i])
        assert tree(results[i]) == tree(modules[i])  # type: ignore[arg-type]
        assert record(fresh, urls[i])["mirror"] == f"s3://{bucket}"
    assert isinstance(results[3], IntegrityError) and "lock file" in str(results[3])
    assert [len(server.gets(f"/w/{i}")) for i in range(4)] == gets  # the origin was not asked
    assert sorted(names(fresh)) == sorted(
        n for i in range(3) for n in (cache_key(urls[i]), f"{cache_key(urls[i])}.descriptor.txt",
                                      f"{cache_key(urls[i])}.manifest.json")
    )  # fmt: skip
