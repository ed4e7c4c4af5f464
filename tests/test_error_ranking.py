"""The error a failed download raises says what failed, whatever the scheduling.

A failure on one side of the pipeline (the extraction thread: a full disk, an
oversized archive) makes the other side (the network task) notice a closed
stream; that artefact must never be what surfaces. Closing a hub, or the
module-level helpers replacing their default hub, lets calls under way finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

import asynchub
from asynchub import (
    AsyncHub,
    CacheError,
    Hub,
    Retries,
    TruncatedArchiveError,
    UnsafeArchiveError,
    _sync,
)
from asynchub._integrity import write_lock
from asynchub.errors import StreamAborted, raise_first
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

FAST = Retries(total=3, backoff=0.01, max_backoff=0.05)


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.is_dir() else []


@pytest.fixture
def big(tmp_path: Path) -> bytes:
    return tar_bytes(make_module(tmp_path / "big", weights=600_000))


# -- the ranking, on the loop: real errors over cancellations over artefacts -----------


async def _raised(group: BaseExceptionGroup[BaseException]) -> BaseException:
    try:
        await raise_first(group)
    except BaseException as exc:
        return exc


@pytest.mark.anyio
async def test_raise_first_ranks_real_errors_above_artefacts() -> None:
    real = CacheError("the disk is full")
    for artefacts in (
        [anyio.BrokenResourceError()],
        [StreamAborted(), anyio.ClosedResourceError()],
        [anyio.EndOfStream()],
    ):
        for group in ([*artefacts, real], [real, *artefacts]):
            assert await _raised(BaseExceptionGroup("g", group)) is real


@pytest.mark.anyio
async def test_raise_first_raises_the_cancellation_of_an_enclosing_scope() -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        for group in ([StreamAborted()], [CacheError("full"), StreamAborted()]):
            with pytest.raises(anyio.get_cancelled_exc_class()):
                await raise_first(BaseExceptionGroup("g", group))
        await anyio.sleep(1)
    assert scope.cancelled_caught  # the scope knew its own cancellation


def test_raise_first_lets_a_pending_asyncio_cancellation_win() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as asyncio.run does on Ctrl-C: once
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # delivered here, taken by a child, say
        assert task.cancelling() == 1  # still wanted
        with pytest.raises(asyncio.CancelledError):
            await raise_first(BaseExceptionGroup("g", [CacheError("full"), StreamAborted()]))
        task.uncancel()
        assert isinstance(await _raised(BaseExceptionGroup("g", [CacheError("x")])), CacheError)
        # Artefacts alone: the host was cancelled, and the group dropped it.
        raised = await _raised(BaseExceptionGroup("g", [StreamAborted()]))
        assert isinstance(raised, asyncio.CancelledError)

    asyncio.run(main())


# -- the extraction side fails: its error, every time ----------------------------------


@pytest.mark.anyio
async def test_an_oversized_archive_is_always_its_own_error(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    url = server.add("/m", body=big, chunk=16 * 1024)
    async with AsyncHub(cache_dir=cache_dir, retries=FAST, max_extract_bytes=100_000) as hub:
        for _ in range(15):
            with pytest.raises(UnsafeArchiveError):
                await hub.resolve(url)
            results = await hub.prefetch([url, url + "?again"], return_exceptions=True)
            assert [type(r) for r in results] == [UnsafeArchiveError] * 2
    assert leftovers(cache_dir) == []


_FULL_DISK = """
import json, resource, signal, sys
import asynchub
# Files may not grow past 200 kB: a write beyond fails with EFBIG, as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
url = sys.argv[1]
seen = []
with asynchub.Hub(retries=asynchub.Retries(total=1, backoff=0.01)) as hub:
    for i in range(8):
        try:
            hub.resolve(f"{url}?{i}")
        except Exception as exc:
            seen.append(type(exc).__name__)
    for processes in (None, 2):
        handles = [f"{url}?p{processes}-{i}" for i in range(4)]
        results = hub.prefetch(handles, return_exceptions=True, processes=processes)
        seen.extend(type(r).__name__ for r in results)
print(json.dumps(seen))
"""


def test_a_full_disk_is_always_a_cache_error(server: Server, cache_dir: Path, big: bytes) -> None:
    url = server.add("/m", body=big, chunk=16 * 1024)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TFHUB_CACHE_DIR": str(cache_dir)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FULL_DISK), url],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == ["CacheError"] * 16, out.stderr
    assert [n for n in leftovers(cache_dir) if n.endswith((".tmp", ".lock"))] == []


# -- an archive that came whole but is truncated in itself: one download -------------


@pytest.mark.anyio
async def test_a_whole_body_truncated_in_itself_is_fetched_once(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    url = server.add("/m", body=big[: len(big) // 2])  # Content-Length: what is sent
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as hub:
        with pytest.raises(TruncatedArchiveError):
            await hub.resolve(url)
    assert len(server.gets("/m")) == 1
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
async def test_a_body_without_length_that_ends_early_is_tried_again(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    url = server.add("/m", body=big[: len(big) // 2], no_length=True)
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as hub:
        with pytest.raises(TruncatedArchiveError):
            await hub.resolve(url)
    assert len(server.gets("/m")) == FAST.total + 1  # a cut connection looks like this


# -- closing a hub lets the calls under way finish -------------------------------------


@pytest.mark.anyio
async def test_aclose_waits_for_calls_under_way(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    url = server.add("/m", body=big, chunk=32 * 1024, throttle=0.01)
    hub = AsyncHub(cache_dir=cache_dir, retries=FAST)
    await hub.__aenter__()
    got: list[Path] = []

    async def download() -> None:
        got.append(await hub.resolve(url))

    async with anyio.create_task_group() as tg:
        tg.start_soon(download)
        while not leftovers(cache_dir):
            await anyio.sleep(0.01)
        await hub.aclose()  # while the download runs
        assert got and (got[0] / "saved_model.pb").is_file()  # it finished first
    with pytest.raises(asynchub.HubClosedError):
        await hub.resolve(url)


def test_closing_a_sync_hub_lets_another_threads_download_finish(
    server: Server, cache_dir: Path, big: bytes
) -> None:
    url = server.add("/m", body=big, chunk=32 * 1024, throttle=0.01)
    hub = Hub(cache_dir=cache_dir, retries=FAST)
    outcome: list[object] = []

    def download() -> None:
        try:
            outcome.append(hub.resolve(url))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=download)
    thread.start()
    while not leftovers(cache_dir):
        thread.join(0.01)
    hub.close()
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Path), outcome
    assert (outcome[0] / "saved_model.pb").is_file()


def test_replacing_the_default_hub_lets_another_threads_download_finish(
    server: Server, cache_dir: Path, tmp_path: Path, big: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m", body=big, chunk=32 * 1024, throttle=0.01)
    small = server.add("/small", body=tar_bytes(make_module(tmp_path / "small")))
    monkeypatch.setattr(_sync, "_default", None)
    outcome: list[object] = []

    def download() -> None:
        try:
            outcome.append(asynchub.resolve(url))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=download)
    thread.start()
    while not leftovers(cache_dir):
        thread.join(0.01)
    other = tmp_path / "other-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(other))  # the default hub is made again
    assert asynchub.resolve(small).parent == other
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Path), outcome
    assert outcome[0].parent == cache_dir
    _sync._close_default()


def test_the_default_hub_follows_every_variable_of_ours(
    server: Server, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = tar_bytes(make_module(tmp_path / "m"))
    url = server.add("/m", body=body)
    monkeypatch.setattr(_sync, "_default", None)
    monkeypatch.delenv("ASYNCHUB_LOCKFILE", raising=False)
    asynchub.resolve(url)  # the default hub is made, without a lock file
    lock = tmp_path / "asynchub.lock"
    write_lock(lock, [])
    monkeypatch.setenv("ASYNCHUB_LOCKFILE", str(lock))
    with pytest.raises(asynchub.IntegrityError, match="lock"):
        asynchub.resolve(url)  # the lock file lists no module: refused
    _sync._close_default()


def test_cache_error_is_a_hub_error() -> None:
    assert issubclass(CacheError, asynchub.HubError)
