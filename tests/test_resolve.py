"""The async resolver against a real HTTP server on 127.0.0.1, on asyncio and trio."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import asynchub
from asynchub import (
    ArchiveError,
    AsyncHub,
    HandleError,
    HTTPStatusError,
    HubClosedError,
    NetworkError,
    OfflineError,
    ProgressKind,
    UnsafeArchiveError,
)
from tests._archives import evil_tar, make_module, tar_bytes, tree
from tests._httpserver import Server

pytestmark = pytest.mark.anyio

FAST = asynchub.Retries(total=3, backoff=0.01, max_backoff=0.05)


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


def listing(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "module-src")


def hub(cache_dir: Path, **kwargs: object) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]


# -- happy paths ----------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
async def test_url_extracts_into_cache_with_tfhub_layout(
    server: Server, cache_dir: Path, module: Path, gz: bool
) -> None:
    url = server.add("/models/m/1", body=tar_bytes(module, gz=gz))
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
    assert path == cache_dir / key(url)
    assert tree(path) == tree(module)
    assert listing(cache_dir) == sorted(
        [key(url), f"{key(url)}.descriptor.txt", f"{key(url)}.manifest.json"]
    )
    descriptor = (cache_dir / f"{key(url)}.descriptor.txt").read_text()
    assert descriptor.startswith(f"Module: {url}\nDownload Time: ")
    assert f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})" in descriptor
    assert server.queries("/models/m/1") == ["tf-hub-format=compressed"]


async def test_existing_query_parameters_are_kept(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module)) + "?version=3&x=a%20b"
    async with hub(cache_dir) as h:
        await h.resolve(url)
    assert server.queries("/m") == ["version=3&x=a+b&tf-hub-format=compressed"]


async def test_wrong_content_type_still_works(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module), content_type="text/plain")
    async with hub(cache_dir) as h:
        assert tree(await h.resolve(url)) == tree(module)


async def test_redirect_to_another_port_drops_authorization(
    cache_dir: Path, module: Path, server: Server
) -> None:
    from tests._httpserver import running

    with running() as other:
        target = other.add("/real", body=tar_bytes(module))
        url = server.add("/m", redirect=target)
        async with hub(cache_dir, headers={"Authorization": "Bearer secret"}) as h:
            path = await h.resolve(url)
        assert tree(path) == tree(module)
        assert server.gets("/m")[0]["Authorization"] == "Bearer secret"
        assert "Authorization" not in other.gets("/real")[0]
    assert path == cache_dir / key(url)  # keyed by the handle, not the final URL


async def test_cache_hit_makes_no_request(server: Server, cache_dir: Path, module: Path) -> None:
    url = server.add("/m", body=tar_bytes(module))
    events: list[ProgressKind] = []
    async with hub(cache_dir, progress=lambda e: events.append(e.kind)) as h:
        first = await h.resolve(url)
        second = await h.resolve(url)
    assert first == second
    assert len(server.gets("/m")) == 1
    assert events[-1] is ProgressKind.CACHED
    assert ProgressKind.DONE in events


async def test_local_dir_used_in_place(cache_dir: Path, module: Path) -> None:
    async with hub(cache_dir) as h:
        assert await h.resolve(module) == module
        assert await h.resolve(str(module)) == module
    assert listing(cache_dir) == []


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar"])
async def test_local_archive_and_file_url(
    tmp_path: Path, cache_dir: Path, module: Path, suffix: str
) -> None:
    archive = tmp_path / f"m{suffix}"
    archive.write_bytes(tar_bytes(module, gz=suffix != ".tar"))
    async with hub(cache_dir) as h:
        by_path = await h.resolve(archive)
        by_url = await h.resolve(archive.as_uri())
    assert tree(by_path) == tree(module) == tree(by_url)
    # A local archive is keyed by its absolute path, however it is named.
    assert by_path == by_url == cache_dir / key(str(archive))


async def test_tfhub_cache_dir_env_is_honoured(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    async with AsyncHub() as h:  # no cache_dir: the fixture set TFHUB_CACHE_DIR
        assert h.cache_dir == cache_dir
        assert (await h.resolve(url)).parent == cache_dir


# -- bad input: clear errors, nothing left behind --------------------------------


async def test_html_page_is_a_clear_archive_error(server: Server, cache_dir: Path) -> None:
    page = b"<!DOCTYPE html><html><body>Module docs</body></html>" * 20
    url = server.add("/m", body=page, content_type="text/html; charset=utf-8")
    async with hub(cache_dir) as h:
        with pytest.raises(
            ArchiveError, match="server returned text/html, not a tar archive"
        ) as ei:
            await h.resolve(url)
    assert url in str(ei.value)
    assert ei.value.handle == url
    assert listing(cache_dir) == []


async def test_404_is_one_request_and_a_clear_error(server: Server, cache_dir: Path) -> None:
    url = server.add("/missing", status=404)
    async with hub(cache_dir) as h:
        with pytest.raises(HTTPStatusError, match="404") as ei:
            await h.resolve(url)
    assert ei.value.status == 404
    assert url in str(ei.value) and "check the handle" in str(ei.value)
    assert len(server.gets("/missing")) == 1
    assert listing(cache_dir) == []


async def test_503_twice_then_success(server: Server, cache_dir: Path, module: Path) -> None:
    url = server.add("/m", body=tar_bytes(module), fail_first=[503, 503], retry_after="0")
    kinds: list[ProgressKind] = []
    async with hub(cache_dir, progress=lambda e: kinds.append(e.kind)) as h:
        assert tree(await h.resolve(url)) == tree(module)
    assert len(server.gets("/m")) == 3
    assert kinds.count(ProgressKind.RETRYING) == 2


async def test_503_forever_gives_up_after_retries(server: Server, cache_dir: Path) -> None:
    url = server.add("/m", status=503)
    async with hub(cache_dir, retries=asynchub.Retries(total=2, backoff=0.01)) as h:
        with pytest.raises(HTTPStatusError) as ei:
            await h.resolve(url)
    assert ei.value.status == 503
    assert len(server.gets("/m")) == 3
    assert listing(cache_dir) == []


async def test_cut_body_is_resumed_with_range(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "big", weights=3_000_000)
    body = tar_bytes(module)
    url = server.add("/m", body=body, cut_at=len(body) // 3)
    async with hub(cache_dir) as h:
        assert tree(await h.resolve(url)) == tree(module)
    gets = server.gets("/m")
    assert len(gets) == 2
    assert gets[1]["Range"] == f"bytes={len(body) // 3}-"
    assert gets[1]["If-Range"].startswith('"')


async def test_cut_body_restarts_when_server_has_no_ranges(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "big", weights=3_000_000)
    body = tar_bytes(module)
    url = server.add("/m", body=body, cut_at=len(body) // 2, ranges=False)
    async with hub(cache_dir) as h:
        assert tree(await h.resolve(url)) == tree(module)
    gets = server.gets("/m")
    assert len(gets) == 2
    assert "Range" not in gets[1]
    assert listing(cache_dir) == sorted(
        [key(url), f"{key(url)}.descriptor.txt", f"{key(url)}.manifest.json"]
    )


async def test_connection_refused_is_a_network_error(cache_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m"
    async with hub(cache_dir, retries=1) as h:
        with pytest.raises(NetworkError, match="could not connect") as ei:
            await h.resolve(url)
    assert ei.value.url is not None and str(port) in ei.value.url
    assert listing(cache_dir) == []


@pytest.mark.parametrize(
    "kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo", "bomb"]
)
async def test_unsafe_archives_are_refused(
    server: Server, cache_dir: Path, tmp_path: Path, kind: str
) -> None:
    url = server.add("/evil", body=evil_tar(kind))
    async with hub(cache_dir, max_extract_bytes=1024) as h:
        with pytest.raises(UnsafeArchiveError) as ei:
            await h.resolve(url)
    assert url in str(ei.value)
    assert listing(cache_dir) == []
    assert not Path("/tmp/asynchub-evil-abs").exists()
    assert not (cache_dir.parent / "asynchub-evil-dotdot").exists()
    assert len(server.gets("/evil")) == 1  # an unsafe archive is not retried


async def test_archive_without_saved_model_names_what_it_found(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    nested = tmp_path / "outer"
    (nested).mkdir()
    os.rename(module, nested / "mymodel")
    url = server.add("/m", body=tar_bytes(nested))
    async with hub(cache_dir) as h:
        with pytest.raises(ArchiveError, match="single directory 'mymodel'"):
            await h.resolve(url)
    assert listing(cache_dir) == []


async def test_truncated_archive_is_an_archive_error(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m", body=body[: len(body) // 2])
    async with hub(cache_dir) as h:
        with pytest.raises(ArchiveError, match="truncated"):
            await h.resolve(url)
    assert listing(cache_dir) == []


@pytest.mark.parametrize("handle", ["", "gcs://bucket/model", "/no/such/dir", "ftp://x/y"])
async def test_bad_handles(cache_dir: Path, handle: str) -> None:
    async with hub(cache_dir) as h:
        with pytest.raises(HandleError, match=r"expected|unsupported|empty"):
            await h.resolve(handle)


async def test_closed_hub_is_misuse(cache_dir: Path) -> None:
    h = hub(cache_dir)
    with pytest.raises(HubClosedError, match="not entered"):
        await h.resolve("http://127.0.0.1:1/m")
    async with h:
        pass
    with pytest.raises(HubClosedError, match="closed"):
        await h.resolve("http://127.0.0.1:1/m")


# -- concurrency, locks, cancellation ---------------------------------------------


async def test_ten_concurrent_resolves_make_one_get(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module), delay=0.2)
    results: list[Path] = []
    async with hub(cache_dir) as h:

        async def one() -> None:
            results.append(await h.resolve(url))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
    assert len(set(results)) == 1 and len(results) == 10
    assert len(server.gets("/m")) == 1


async def test_cancelled_resolve_leaves_no_tmp_dir_or_lock(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "big", weights=4_000_000)
    url = server.add("/m", body=tar_bytes(module), chunk=16 * 1024, throttle=0.01)
    seen_tmp = False
    async with hub(cache_dir) as h:
        with anyio.move_on_after(0.5) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.resolve, url)
                while not any(n.endswith(".tmp") for n in listing(cache_dir)):
                    await anyio.sleep(0.01)
                seen_tmp = f"{key(url)}.lock" in listing(cache_dir)
                await anyio.sleep(10)
    assert scope.cancelled_caught
    assert seen_tmp
    assert listing(cache_dir) == []


async def test_lock_of_dead_process_is_taken_over_at_once(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    cache_dir.mkdir(parents=True)
    lock = cache_dir / f"{key(url)}.lock"
    lock.write_text(f"{socket.gethostname()}.{int(dead.stdout)}.deadbeef")
    stale_tmp = cache_dir / f"{key(url)}.deadbeef.tmp"
    stale_tmp.mkdir()
    async with hub(cache_dir, lock_stale_after=3600) as h:
        with anyio.fail_after(10):
            assert tree(await h.resolve(url)) == tree(module)
    assert not lock.exists()


async def test_lock_from_other_host_taken_over_when_tmp_stops_growing(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    cache_dir.mkdir(parents=True)
    (cache_dir / f"{key(url)}.lock").write_text("other.host.example.4242.cafe")
    async with hub(cache_dir, lock_stale_after=0.3) as h:
        with anyio.fail_after(10):
            assert tree(await h.resolve(url)) == tree(module)


async def test_live_lock_times_out_with_clear_error(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    cache_dir.mkdir(parents=True)
    lock = cache_dir / f"{key(url)}.lock"
    lock.write_text(f"{socket.gethostname()}.{os.getppid()}.f00d")
    async with hub(cache_dir, lock_timeout=0.3) as h:
        with pytest.raises(asynchub.LockTimeoutError, match="lock"):
            await h.resolve(url)
    assert lock.read_text().endswith(".f00d")  # not ours: left alone
    assert server.gets("/m") == []


async def test_entry_with_a_deleted_file_is_fetched_again(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
        (path / "variables" / "variables.index").unlink()
        again = await h.resolve(url)
    assert again == path
    assert tree(again) == tree(module)
    assert len(server.gets("/m")) == 2
    assert not any(n.endswith(".tmp") for n in listing(cache_dir))


async def test_entry_written_by_tensorflow_hub_is_used_as_is(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.url("/never-served")
    entry = cache_dir / key(url)
    entry.parent.mkdir(parents=True)
    os.rename(module, entry)
    (cache_dir / f"{key(url)}.descriptor.txt").write_text(f"Module: {url}\n")
    async with hub(cache_dir) as h:
        assert await h.resolve(url) == entry
    assert server.requests == []


async def test_offline_hit_and_miss(server: Server, cache_dir: Path, module: Path) -> None:
    url = server.add("/m", body=tar_bytes(module))
    async with hub(cache_dir) as h:
        await h.resolve(url)
    async with hub(cache_dir, offline=True) as h:
        assert (await h.resolve(url)).is_dir()
        with pytest.raises(OfflineError) as ei:
            await h.resolve(server.url("/other"))
    assert str(cache_dir) in str(ei.value) and "/other" in str(ei.value)
    assert len(server.requests) == 1


async def test_progress_reports_bytes(server: Server, cache_dir: Path, tmp_path: Path) -> None:
    module = make_module(tmp_path / "big", weights=2_000_000)
    body = tar_bytes(module)
    url = server.add("/m", body=body)
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        await h.resolve(url)
    downloading = [e for e in events if e.kind is ProgressKind.DOWNLOADING]
    assert downloading and downloading[-1].done == len(body) == downloading[-1].total
    assert events[0].kind is ProgressKind.QUEUED
    assert events[-1].kind is ProgressKind.DONE and events[-1].path is not None


_RACER = textwrap.dedent(
    """
    import json, sys, anyio, asynchub
    async def main():
        async with asynchub.AsyncHub(cache_dir=sys.argv[1]) as hub:
            path = await hub.resolve(sys.argv[2])
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        print(json.dumps({"path": str(path), "files": files}))
    anyio.run(main)
    """
)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_processes_racing_make_one_get(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module), delay=0.5)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(cache_dir), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _err in outs]
    assert results[0] == results[1]
    assert "variables/variables.index" in results[0]["files"]
    assert len(server.gets("/m")) == 1
    assert not any(n.endswith((".tmp", ".lock")) for n in listing(cache_dir))


@pytest.mark.parametrize("backend", ["zlib", "isal"])
async def test_gzip_backend_can_be_chosen(
    server: Server, cache_dir: Path, module: Path, backend: str
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    async with hub(cache_dir, gzip_backend=backend) as h:
        assert h.config.gzip_backend == backend
        assert tree(await h.resolve(url)) == tree(module)


async def test_unknown_gzip_backend_is_refused_when_the_hub_is_made(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCHUB_GZIP", "brotli")
    with pytest.raises(ValueError, match="unknown gzip backend 'brotli'"):
        AsyncHub()
