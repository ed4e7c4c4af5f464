"""prefetch(..., processes=2): the same contract as in-process, over worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

import asynchub
from asynchub import (
    ArchiveError,
    HTTPStatusError,
    HubError,
    PrefetchError,
    ProgressEvent,
    ProgressKind,
    _workers,
)
from asynchub._store import Entry, locks
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests.test_prefetch import _three_of_ten, complete, hub, key, leftovers

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("modules")
    return [tar_bytes(make_module(root / f"m{i}", weights=20_000, seed=i)) for i in range(10)]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tar_bytes(make_module(tmp_path_factory.mktemp("big") / "big", weights=1_000_000))


def workers_left() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


async def test_order_duplicates_and_progress(
    server: Server, cache_dir: Path, bodies: list[bytes], spawned: list[int]
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i], delay=0.02 * (5 - i)) for i in range(5)]
    handles = [urls[4], urls[0], urls[4], urls[1], urls[2], urls[3], urls[0]]
    events: list[ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        paths = await h.prefetch(handles, processes=2)
    assert paths == [cache_dir / key(u) for u in handles]
    assert all(len(server.gets(f"/m/{i}")) == 1 for i in range(5))
    done = [e.handle for e in events if e.kind is ProgressKind.DONE]
    assert sorted(done) == sorted(urls)
    assert all(e.path == cache_dir / key(e.handle) for e in events if e.kind is ProgressKind.DONE)
    assert any(e.kind is ProgressKind.DOWNLOADING for e in events)
    assert len(spawned) == 2
    assert leftovers(cache_dir) == []
    assert workers_left() == []


async def test_three_failing_of_ten(
    server: Server, cache_dir: Path, bodies: list[bytes], spawned: list[int]
) -> None:
    handles, bad = _three_of_ten(server, bodies)
    async with hub(cache_dir) as h:
        with pytest.raises(PrefetchError) as ei:
            await h.prefetch(handles, processes=2)
    error = ei.value
    assert str(error).startswith("3 of 10 handles failed: ")
    errors = [e for e in error.exceptions if isinstance(e, HubError)]
    assert [e.handle for e in errors] == [h for h in handles if h in bad]
    for exc in errors:
        assert exc.handle is not None and type(exc) is bad[exc.handle]
        assert exc.handle in str(exc) and exc.handle in str(error)
    statuses = {e.handle: e.status for e in errors if isinstance(e, HTTPStatusError)}
    assert sorted(statuses.values()) == [404, 503]
    assert all(isinstance(e, HTTPStatusError) and e.url for e in errors if e.handle in statuses)
    assert all(complete(cache_dir, h) for h in handles if h not in bad)
    assert len(spawned) == 2
    assert leftovers(cache_dir) == []


async def test_return_exceptions(server: Server, cache_dir: Path, bodies: list[bytes]) -> None:
    handles, bad = _three_of_ten(server, bodies)
    handles.append(handles[2])
    async with hub(cache_dir) as h:
        results = await h.prefetch(handles, return_exceptions=True, processes=2)
    for handle, result in zip(handles, results, strict=True):
        if handle in bad:
            assert type(result) is bad[handle] and isinstance(result, HubError)
            assert result.handle == handle
        else:
            assert result == cache_dir / key(handle)
    assert results[2] is results[10]
    assert len(server.gets("/missing")) == 1
    assert isinstance(results[4], ArchiveError)


async def test_cached_and_local_handles_start_no_process(
    server: Server, cache_dir: Path, bodies: list[bytes], spawned: list[int], tmp_path: Path
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(3)]
    local = make_module(tmp_path / "local")
    async with hub(cache_dir) as h:
        await h.prefetch(urls)
        events: list[ProgressEvent] = []
        h._events.callback = events.append  # the hub's progress sink (_fetch.events)
        paths = await h.prefetch([*urls, local], processes=2)
        assert paths == [*(cache_dir / key(u) for u in urls), local]
        assert spawned == []
        assert [e.kind for e in events] == [ProgressKind.CACHED] * 3
        # One download left: not worth a process either.
        one = server.add("/one", body=bodies[5])
        assert await h.prefetch([*urls, one], processes=2) == [
            *(cache_dir / key(u) for u in urls),
            cache_dir / key(one),
        ]
    assert spawned == []


@pytest.mark.parametrize(("hub_limit", "call_limit"), [(8, 2), (2, None), (3, None)])
async def test_concurrency_bound_holds_across_processes(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    hub_limit: int,
    call_limit: int | None,
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i], delay=0.25) for i in range(6)]
    async with hub(cache_dir, max_concurrency=hub_limit) as h:
        await h.prefetch(urls, max_concurrency=call_limit, processes=2)
    assert server.max_active == min(hub_limit, call_limit or hub_limit)
    assert all(complete(cache_dir, u) for u in urls)


@pytest.mark.timeout(30)
async def test_cancelled_prefetch_leaves_no_tmp_lock_or_process(
    server: Server, cache_dir: Path, big: bytes, spawned: list[int]
) -> None:
    urls = [server.add(f"/m/{i}", body=big, chunk=16 * 1024, throttle=0.02) for i in range(4)]
    seen: list[str] = []
    async with hub(cache_dir, max_concurrency=4) as h:
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: h.prefetch(urls, processes=2))
                while sum(n.endswith(".lock") for n in seen) < 4 or len(seen) < 8:
                    seen = leftovers(cache_dir)
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert h._limiter is not None and h._limiter.borrowed_tokens == 0  # no slot leaked
    assert not scope.cancelled_caught, "the downloads never all started"
    assert len(spawned) == 2
    assert leftovers(cache_dir) == []
    assert not any(complete(cache_dir, u) for u in urls)
    assert workers_left() == []


@pytest.mark.timeout(30)
async def test_a_killed_worker_fails_its_handles_clearly(
    server: Server, cache_dir: Path, big: bytes, bodies: list[bytes], spawned: list[int]
) -> None:
    slow = server.add("/slow", body=big, chunk=16 * 1024, throttle=0.02)
    quick = [server.add(f"/q/{i}", body=bodies[i]) for i in range(4)]
    victim: list[int] = []

    def progress(event: ProgressEvent) -> None:
        # The first bytes of /slow: kill the worker that fetches it (its pid is in the lock).
        if event.handle == slow and event.kind is ProgressKind.DOWNLOADING and not victim:
            info = locks.parse_lock(locks.read_lock(Entry(cache_dir, key(slow))) or "")
            assert info is not None and info.pid in spawned
            victim.append(info.pid)
            os.kill(info.pid, signal.SIGKILL)

    async with hub(cache_dir, max_concurrency=2, progress=progress) as h:
        with anyio.fail_after(20):
            results = await h.prefetch([slow, *quick], processes=2, return_exceptions=True)
        assert h._limiter is not None and h._limiter.borrowed_tokens == 0
    assert victim, "no worker was killed"
    error = results[0]
    assert isinstance(error, HubError) and error.handle == slow
    assert str(error).startswith(f"worker process exited with code -9 while resolving {slow}")
    # The other handles went to the other worker, or failed the same clear way.
    for handle, result in zip(quick, results[1:], strict=True):
        assert result == cache_dir / key(handle) or (
            isinstance(result, HubError) and "worker process exited" in str(result)
        )
    assert any(isinstance(r, Path) for r in results)
    assert leftovers(cache_dir) == []  # the parent removed the dead worker's tmp dir and lock
    assert workers_left() == []


def test_sync_hub_and_module_helpers_take_processes(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(3)]
    with asynchub.Hub(cache_dir=cache_dir) as h:
        assert h.prefetch(urls, processes=2) == [cache_dir / key(u) for u in urls]
    assert asynchub.prefetch(urls, processes=2) == [cache_dir / key(u) for u in urls]
    with pytest.raises(ValueError, match="processes"):
        asynchub.prefetch(urls, processes=0)


def test_error_round_trip() -> None:
    error = HTTPStatusError("h: 404", handle="h", url="http://x/h", status=404)
    back = _workers.error_from_json(json.loads(json.dumps(_workers.error_to_json(error))))
    assert type(back) is HTTPStatusError
    assert (str(back), back.handle, back.url, back.status) == ("h: 404", "h", "http://x/h", 404)
    bug = _workers.error_from_json(_workers.error_to_json(ZeroDivisionError("x")))
    assert type(bug) is HubError and str(bug) == "ZeroDivisionError: x"


@pytest.mark.timeout(60)
def test_cli_prefetch_with_processes(server: Server, cache_dir: Path, bodies: list[bytes]) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(3)]
    missing = server.add("/missing", status=404)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from asynchub.cli import main; main(prog_name='asynchub')",
            "prefetch",
            "--processes",
            "2",
            "--json",
            "--cache-dir",
            str(cache_dir),
            *urls,
            missing,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert [r["ok"] for r in data["results"]] == [True, True, True, False]
    assert data["results"][3]["error_type"] == "HTTPStatusError"
    assert [r["path"] for r in data["results"][:3]] == [str(cache_dir / key(u)) for u in urls]
    assert all(len(server.gets(f"/m/{i}")) == 1 for i in range(3))


@pytest.mark.timeout(60)
def test_cli_ctrl_c_stops_the_workers_and_leaves_a_clean_cache(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    urls = [server.add(f"/m/{i}", body=big, chunk=16 * 1024, throttle=0.02) for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = "from asynchub.cli import main; main(prog_name='asynchub')"
    args = ["prefetch", "-q", "-j", "4", "--processes", "2", "--cache-dir", str(cache_dir)]
    with subprocess.Popen(
        [sys.executable, "-c", command, *args, *urls],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as cli:
        try:
            deadline = time.monotonic() + 30
            while sum(n.endswith(".lock") for n in leftovers(cache_dir)) < 4:
                assert time.monotonic() < deadline, "the downloads never all started"
                time.sleep(0.02)
            workers = psutil.Process(cli.pid).children()
            assert len(workers) == 2
            cli.send_signal(signal.SIGINT)
            _out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
    assert cli.returncode == 130, err
    assert "error: interrupted" in err
    assert leftovers(cache_dir) == []
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


# -- processes="auto": the number decided from the cores and the downloads -------------


@pytest.mark.parametrize(
    ("downloads", "cores", "expected"),
    [
        (16, 1, 0),
        (16, 2, 0),  # one process uses ~1.4 cores: a second only adds its start-up
        (16, 3, 0),
        (16, 4, 2),
        (16, 8, 4),
        (16, 64, 4),  # at most 4
        (3, 8, 0),  # one process per 2 downloads, and never just one
        (4, 8, 2),
        (7, 8, 3),
        (0, 8, 0),
    ],
)
def test_plan_processes(downloads: int, cores: int, expected: int) -> None:
    from asynchub._workers import plan_processes

    assert plan_processes(downloads, cores) == expected


def test_usable_cores_follow_the_affinity() -> None:
    from asynchub._workers import usable_cores

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("cores", [2, 8])
async def test_auto_starts_workers_only_where_they_pay(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    spawned: list[int],
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
) -> None:
    from asynchub import _prefetch

    monkeypatch.setattr(_prefetch, "usable_cores", lambda: cores)
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(6)]
    async with hub(cache_dir) as h:
        paths = await h.prefetch(urls, processes="auto")
        assert paths == [cache_dir / key(u) for u in urls]
        assert all(complete(cache_dir, u) for u in urls)
        # All cached now: nothing to download, so no worker either way.
        before = len(spawned)
        assert await h.prefetch(urls, processes="auto") == paths
        assert len(spawned) == before
    # 6 downloads on 8 cores: min(4, 8 // 2, 6 // 2) = 3 workers; on 2 cores none.
    assert len(spawned) == (3 if cores == 8 else 0)
    assert workers_left() == []


async def test_processes_must_be_a_count_or_auto(cache_dir: Path) -> None:
    async with hub(cache_dir) as h:
        with pytest.raises(TypeError, match="processes"):
            await h.prefetch([], processes="many")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="processes"):
            await h.prefetch([], processes=0)
