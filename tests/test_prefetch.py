"""Batch prefetch against a real HTTP server on 127.0.0.1, and the progress display."""

from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path

import anyio
import pytest
from rich.console import Console

import asynchub
from asynchub import (
    ArchiveError,
    AsyncHub,
    HandleError,
    HTTPStatusError,
    HubClosedError,
    HubError,
    OfflineError,
    PrefetchError,
    ProgressEvent,
    ProgressKind,
)
from asynchub._display import ProgressDisplay, format_bytes, short_handle
from asynchub._store import Store
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio

FAST = asynchub.Retries(total=2, backoff=0.01, max_backoff=0.02)


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


def leftovers(cache_dir: Path) -> list[str]:
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if p.name.endswith((".tmp", ".lock")))


def hub(cache_dir: Path, **kwargs: object) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Ten small distinct module archives, built once for the whole file."""
    root = tmp_path_factory.mktemp("modules")
    return [tar_bytes(make_module(root / f"m{i}", weights=20_000, seed=i)) for i in range(10)]


def complete(cache_dir: Path, handle: str) -> bool:
    return Store(cache_dir).lookup(key(handle)) is not None


# -- results, order, duplicates ----------------------------------------------------


async def test_results_in_input_order_and_duplicates_fetched_once(
    server: Server, cache_dir: Path, bodies: list[bytes], tmp_path: Path
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i], delay=0.05 * (3 - i)) for i in range(3)]
    local = make_module(tmp_path / "local")
    handles: list[asynchub._types.Handle] = [urls[2], urls[0], local, urls[2], urls[1], urls[0]]
    async with hub(cache_dir) as h:
        paths = await h.prefetch(handles)
    assert paths == [
        cache_dir / key(urls[2]),
        cache_dir / key(urls[0]),
        local,
        cache_dir / key(urls[2]),
        cache_dir / key(urls[1]),
        cache_dir / key(urls[0]),
    ]
    for i in range(3):
        assert len(server.gets(f"/m/{i}")) == 1
    assert leftovers(cache_dir) == []


async def test_str_and_path_of_one_archive_are_one_handle(
    cache_dir: Path, bodies: list[bytes], tmp_path: Path
) -> None:
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(bodies[0])
    events: list[ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        paths = await h.prefetch([archive, str(archive)])
    assert paths[0] == paths[1] == cache_dir / key(str(archive))
    assert [e.kind for e in events].count(ProgressKind.DONE) == 1


async def test_empty_and_invalid_arguments(cache_dir: Path) -> None:
    async with hub(cache_dir) as h:
        assert await h.prefetch([]) == []
        with pytest.raises(ValueError, match="max_concurrency"):
            await h.prefetch(["x"], max_concurrency=0)
    with pytest.raises(HubClosedError):
        await h.prefetch(["http://127.0.0.1:1/m"])


async def test_cached_handles_do_not_wait_for_a_download_slot(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    cached = server.add("/cached", body=bodies[0])
    slow = server.add("/slow", body=bodies[1], delay=0.8)
    async with hub(cache_dir) as h:
        await h.resolve(cached)
    events: list[ProgressEvent] = []
    async with hub(cache_dir, progress=events.append) as h:
        # One slot, taken first by the slow download: the hit must not queue behind it.
        await h.prefetch([slow, cached], max_concurrency=1)
    order = [(e.kind, e.handle) for e in events]
    assert order.index((ProgressKind.CACHED, cached)) < order.index((ProgressKind.DONE, slow))
    assert len(server.gets("/cached")) == 1


# -- failures ----------------------------------------------------------------------------


def _three_of_ten(server: Server, bodies: list[bytes]) -> tuple[list[str], dict[str, type]]:
    handles = [server.add(f"/ok/{i}", body=bodies[i]) for i in range(7)]
    bad = {
        server.add("/missing", status=404): HTTPStatusError,
        server.add("/broken", status=503): HTTPStatusError,
        server.add("/page", body=b"<!DOCTYPE html><html></html>" * 30, content_type="text/html"): (
            ArchiveError
        ),
    }
    handles[2:2] = list(bad)  # failures in the middle: order must survive them
    return handles, bad


async def test_three_failing_of_ten_raise_one_prefetch_error(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    handles, bad = _three_of_ten(server, bodies)
    async with hub(cache_dir) as h:
        with pytest.raises(PrefetchError) as ei:
            await h.prefetch(handles)
    error = ei.value
    assert isinstance(error, HubError) and isinstance(error, ExceptionGroup)
    assert str(error).startswith("3 of 10 handles failed: ")
    errors = [e for e in error.exceptions if isinstance(e, HubError)]
    assert [e.handle for e in errors] == [h for h in handles if h in bad]  # input order
    for exc in errors:
        assert exc.handle is not None and isinstance(exc, bad[exc.handle])
        assert exc.handle in str(exc) and exc.handle in str(error)
    good = [h for h in handles if h not in bad]
    assert len(good) == 7 and all(complete(cache_dir, h) for h in good)
    assert leftovers(cache_dir) == []


async def test_return_exceptions_puts_errors_in_place(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    handles, bad = _three_of_ten(server, bodies)
    handles.append(handles[2])  # a failing duplicate: the same error, fetched once
    async with hub(cache_dir) as h:
        results = await h.prefetch(handles, return_exceptions=True)
    assert len(results) == 11
    for handle, result in zip(handles, results, strict=True):
        if handle in bad:
            assert isinstance(result, bad[handle])
            assert isinstance(result, HubError) and result.handle == handle
        else:
            assert result == cache_dir / key(handle) and complete(cache_dir, handle)
    assert results[2] is results[10]
    assert len(server.gets("/missing")) == 1


async def test_bad_handle_is_reported_with_the_others(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    good = server.add("/m", body=bodies[0])
    async with hub(cache_dir) as h:
        results = await h.prefetch([good, "gcs://bucket/m", 42], return_exceptions=True)  # type: ignore[list-item]
    assert results[0] == cache_dir / key(good)
    assert isinstance(results[1], HandleError) and results[1].handle == "gcs://bucket/m"
    assert isinstance(results[2], HandleError) and "42" in str(results[2].handle)


async def test_a_bug_propagates_and_cancels_the_rest(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    big = tar_bytes(make_module(tmp_path / "big", weights=1_000_000))
    slow = [server.add(f"/slow/{i}", body=big, chunk=16 * 1024, throttle=0.02) for i in range(3)]
    buggy = server.add("/buggy", body=big)

    def progress(event: ProgressEvent) -> None:
        if event.handle == buggy and event.kind is ProgressKind.EXTRACTING:
            raise ZeroDivisionError("a bug in a callback")

    async with hub(cache_dir, progress=progress) as h:
        with anyio.fail_after(10):
            with pytest.raises(ZeroDivisionError, match="a bug"):
                await h.prefetch([*slow, buggy])
    assert not any(complete(cache_dir, u) for u in slow)
    assert leftovers(cache_dir) == []


# -- cancellation, concurrency -------------------------------------------------------------


async def test_cancelled_prefetch_leaves_a_clean_cache(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    big = tar_bytes(make_module(tmp_path / "big", weights=1_000_000))
    urls = [server.add(f"/m/{i}", body=big, chunk=16 * 1024, throttle=0.02) for i in range(4)]
    seen: list[str] = []
    async with hub(cache_dir) as h:
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.prefetch, urls)
                # Wait until every download holds its lock and writes into its .tmp dir.
                while sum(n.endswith(".lock") for n in seen) < 4 or len(seen) < 8:
                    seen = leftovers(cache_dir)
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    assert not scope.cancelled_caught, "the downloads never all started"
    assert leftovers(cache_dir) == []
    assert not any(complete(cache_dir, u) for u in urls)


@pytest.mark.parametrize(
    ("hub_limit", "call_limit"), [(8, 2), (2, None)], ids=["per-call", "hub-wide"]
)
async def test_concurrency_bound_holds(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    hub_limit: int,
    call_limit: int | None,
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i], delay=0.25) for i in range(6)]
    async with hub(cache_dir, max_concurrency=hub_limit) as h:
        await h.prefetch(urls, max_concurrency=call_limit)
    assert server.max_active == 2  # bounded, and the bound was used


async def test_hub_limit_bounds_two_calls_together(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i], delay=0.25) for i in range(6)]
    async with hub(cache_dir, max_concurrency=2) as h, anyio.create_task_group() as tg:
        tg.start_soon(lambda: h.prefetch(urls[:3], max_concurrency=3))
        tg.start_soon(lambda: h.prefetch(urls[3:], max_concurrency=3))
    assert server.max_active == 2
    assert all(complete(cache_dir, u) for u in urls)


# -- offline ----------------------------------------------------------------------------------


async def test_offline_hit_and_miss(server: Server, cache_dir: Path, bodies: list[bytes]) -> None:
    hit = server.add("/hit", body=bodies[0])
    miss = server.add("/miss", body=bodies[1])
    async with hub(cache_dir) as h:
        await h.prefetch([hit])
    requests = len(server.requests)
    async with hub(cache_dir, offline=True) as h:
        assert await h.prefetch([hit]) == [cache_dir / key(hit)]
        results = await h.prefetch([hit, miss], return_exceptions=True)
        with pytest.raises(PrefetchError, match="1 of 2 handles failed") as ei:
            await h.prefetch([miss, hit], max_concurrency=1)
    assert results[0] == cache_dir / key(hit)
    assert isinstance(results[1], OfflineError) and results[1].handle == miss
    assert [type(e) for e in ei.value.exceptions] == [OfflineError]
    assert len(server.requests) == requests  # offline: not one request


async def test_offline_from_the_environment(
    server: Server, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCHUB_OFFLINE", "1")
    url = server.url("/never")
    async with AsyncHub(cache_dir=cache_dir) as h:
        with pytest.raises(PrefetchError) as ei:
            await h.prefetch([url])
    assert isinstance(ei.value.exceptions[0], OfflineError)
    assert server.requests == []


# -- the progress display ---------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _events(a: str, b: str, c: str, clock: Clock) -> list[tuple[float, ProgressEvent]]:
    e = ProgressEvent
    k = ProgressKind
    return [
        (0.0, e(k.QUEUED, a)),
        (0.0, e(k.QUEUED, b)),
        (0.5, e(k.DOWNLOADING, a, done=1_000_000, total=4_000_000)),
        (1.0, e(k.DOWNLOADING, b, done=100, total=None)),
        (2.0, e(k.DOWNLOADING, a, done=2_000_000, total=4_000_000)),
        (3.0, e(k.RETRYING, b, attempt=1, error=ConnectionError("reset by peer"))),
        (4.0, e(k.DOWNLOADING, a, done=3_000_000, total=4_000_000)),
        (6.0, e(k.DOWNLOADING, a, done=4_000_000, total=4_000_000)),
        (6.0, e(k.EXTRACTING, a, done=4_000_000, total=4_000_000)),
        (6.5, e(k.DONE, a, path=Path("/cache/a"))),
        (7.0, e(k.FAILED, b, error=HTTPStatusError(f"{b}: 404 Not Found\nmore", status=404))),
        (7.0, e(k.CACHED, c, path=Path("/cache/c"))),
    ]


def test_rich_display_draws_lines_and_summaries() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    clock = Clock()
    a = "https://models.example.com/google/some/very/long/path/mobilenet_v2/feature_vector/5"
    b, c = "https://example.com/models/b/1", "/data/models/c.tar.gz"
    display = ProgressDisplay(console=console, clock=clock)
    assert display.fancy
    display.start()
    frames = []
    for at, event in _events(a, b, c, clock):
        clock.now = 100.0 + at
        display(event)
        if event.kind is ProgressKind.DOWNLOADING:
            display._progress.refresh()  # type: ignore[union-attr]
            frames.append(_ANSI.sub("", out.getvalue()))
    display.stop()
    display.stop()  # idempotent
    text = _ANSI.sub("", out.getvalue())
    assert short_handle(a) == "…" + a[-39:]  # long handles keep their end
    assert "models.example.com" not in text
    # A line per module (handle, bytes, rate, ETA) and a total line, redrawn in place.
    last = frames[-1].rsplit(short_handle(a), 1)[1]
    assert "4.0/4.0 MB" in last and "0/2 done" in last and "total" in last
    assert re.search(r"2\.0/4\.0 MB\s+666\.7 kB/s\s+0:00:03", frames[2])
    assert f"✓ {short_handle(a)}  4.0 MB in 6.0 s (666.7 kB/s)" in text
    assert f"↻ {short_handle(b)}: retrying (attempt 1): reset by peer" in text
    # The handle is not repeated from the error's message, and only its first line shows.
    assert f"✗ {short_handle(b)}: 404 Not Found\n" in text and "more" not in text
    assert "✓ /data/models/c.tar.gz (cached)" in text
    assert text.rstrip().splitlines()[-1].startswith("total ")  # the final state stays
    assert re.search(r"4\.0/4\.0 MB .* 2/2 done$", text.rstrip())


def test_plain_display_one_line_per_state_change() -> None:
    out = io.StringIO()
    clock = Clock()
    a, b, c = "https://example.com/a/1", "https://example.com/b/1", "/m/c.tgz"
    display = ProgressDisplay(stream=out, fancy=False, clock=clock, interval=5.0)
    display.start()
    for at, event in _events(a, b, c, clock):
        clock.now = 100.0 + at
        display(event)
    display.stop()
    assert out.getvalue().splitlines() == [
        f"asynchub: queued {a}",
        f"asynchub: queued {b}",
        f"asynchub: downloading {a} (4.0 MB)",
        f"asynchub: downloading {b}",
        f"asynchub: retrying {b} (attempt 1): reset by peer",
        f"asynchub: downloading {a}: 4.0 MB of 4.0 MB (100%)",  # 5.5 s after the first line
        f"asynchub: done {a}: 4.0 MB in 6.0 s (666.7 kB/s) -> /cache/a",
        f"asynchub: failed {b}: 404 Not Found",
        f"asynchub: cached {c} -> /cache/c",
    ]


def test_display_never_raises() -> None:
    out = io.StringIO()
    display = ProgressDisplay(stream=out, fancy=False)
    out.close()
    display(ProgressEvent(ProgressKind.QUEUED, "h"))
    display(ProgressEvent(ProgressKind.FAILED, "h", error=KeyboardInterrupt()))
    out = io.StringIO()
    ProgressDisplay(stream=out)(ProgressEvent(ProgressKind.FAILED, "h", error=KeyboardInterrupt()))
    assert out.getvalue() == "asynchub: failed h: cancelled\n"


def test_display_is_plain_when_not_a_terminal() -> None:
    assert not ProgressDisplay(stream=io.StringIO()).fancy


def test_short_handle_and_bytes() -> None:
    assert short_handle("https://tfhub.dev/google/m/1?tf-hub-format=compressed") == (
        "tfhub.dev/google/m/1"
    )
    assert short_handle("x" * 50, width=10) == "…" + "x" * 9
    assert format_bytes(999) == "999 bytes"
    assert format_bytes(25_000_000) == "25.0 MB"


async def test_hub_draws_progress_when_the_environment_asks(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TFHUB_DOWNLOAD_PROGRESS", "1")
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(2)]
    async with AsyncHub(cache_dir=cache_dir) as h:
        await h.prefetch(urls)
        await h.prefetch(urls)
    err = capsys.readouterr().err
    for url in urls:
        assert f"asynchub: queued {url}" in err
        assert f"asynchub: done {url}: " in err
        assert f"asynchub: cached {url} -> {cache_dir / key(url)}" in err


async def test_prefetched_modules_are_whole(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    modules = [make_module(tmp_path / f"src{i}", weights=300_000, seed=i) for i in range(3)]
    urls = [server.add(f"/w/{i}", body=tar_bytes(m)) for i, m in enumerate(modules)]
    async with hub(cache_dir) as h:
        paths = await h.prefetch(urls, max_concurrency=2)
    assert [tree(p) for p in paths if isinstance(p, Path)] == [tree(m) for m in modules]
