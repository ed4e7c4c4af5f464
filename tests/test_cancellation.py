"""Every cancellation honoured: the way users stop a download, on each event loop.

asyncio's one-shot cancellations (``asyncio.timeout``, ``wait_for``, a failing
sibling in an ``asyncio.TaskGroup``, and Ctrl-C under ``asyncio.run``, which the
runner turns into one ``task.cancel()``) are delivered once: a library that
turns them into an error of its own, or a retry, has swallowed them for good.
anyio's and trio's cancel scopes are level-triggered and are tried too.

Each case downloads from a real server that stalls mid-body for far longer
than the test waits, so a swallowed cancellation shows as a call that returns
(or retries) instead of stopping; each must stop at once, with the caller's own
exception, and leave nothing in the cache. Signals go to child processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import asynchub
from asynchub import AsyncHub, Retries
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests._objstores import HookProxy, S3Server

if sys.version_info < (3, 11):  # asyncio.timeout and asyncio.TaskGroup are 3.11's
    pytest.skip("asyncio's one-shot cancellations of 3.11", allow_module_level=True)
    from exceptiongroup import ExceptionGroup

FAST = Retries(total=3, backoff=0.01, max_backoff=0.05)
#: The most a cancelled call may take to stop (clean-up included); a swallowed
#: cancellation runs into the server's stall (far longer) or returns normally.
STOP_WITHIN = 5.0


@pytest.fixture
def stalling(server: Server, tmp_path: Path) -> str:
    """A module whose body stalls for 60 s after 64 KiB on its first GET (then is whole)."""
    body = tar_bytes(make_module(tmp_path / "m", weights=400_000))
    return server.add("/m", body=body, chunk=16 * 1024, stall_at=64 * 1024, stall_for=60)


def started(cache_dir: Path) -> bool:
    """A download is under way: its tmp dir exists."""
    return cache_dir.is_dir() and any(p.name.endswith(".tmp") for p in cache_dir.iterdir())


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.is_dir() else []


Call = Callable[[AsyncHub, str], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "resolve": lambda hub, url: hub.resolve(url),
    "prefetch": lambda hub, url: hub.prefetch([url]),
}


async def _wait_started(cache_dir: Path) -> None:
    while not started(cache_dir):
        await anyio.sleep(0.01)


def _hub(cache_dir: Path) -> AsyncHub:
    return AsyncHub(cache_dir=cache_dir, retries=FAST)


# -- asyncio's one-shot cancellations, under asyncio.run ---------------------------------


@pytest.mark.parametrize("call", sorted(CALLS))
def test_asyncio_timeout_stops_a_download(
    call: str, stalling: str, cache_dir: Path, server: Server
) -> None:
    async def main() -> None:
        async with _hub(cache_dir) as hub:
            async with asyncio.timeout(0.5):
                await CALLS[call](hub, stalling)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - t0 < 0.5 + STOP_WITHIN
    assert leftovers(cache_dir) == []
    assert len(server.gets("/m")) == 1  # stopped, not retried


def test_asyncio_wait_for_stops_a_download(stalling: str, cache_dir: Path) -> None:
    async def main() -> None:
        async with _hub(cache_dir) as hub:
            await asyncio.wait_for(hub.resolve(stalling), 0.5)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - t0 < 0.5 + STOP_WITHIN
    assert leftovers(cache_dir) == []


def test_a_failing_asyncio_taskgroup_sibling_stops_a_download(
    stalling: str, cache_dir: Path
) -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        async with _hub(cache_dir) as hub, asyncio.TaskGroup() as tg:
            tg.create_task(hub.resolve(stalling))
            tg.create_task(hub.load(stalling))
            await _wait_started(cache_dir)
            raise Boom

    t0 = time.monotonic()
    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(main())
    assert info.group_contains(Boom)
    assert [type(e) for e in info.value.exceptions] == [Boom]  # nothing of ours beside it
    assert time.monotonic() - t0 < STOP_WITHIN
    assert leftovers(cache_dir) == []


def test_a_cancelled_task_is_cancelled_not_answered(stalling: str, cache_dir: Path) -> None:
    async def main() -> None:
        async with _hub(cache_dir) as hub:
            task = asyncio.create_task(hub.resolve(stalling))
            await _wait_started(cache_dir)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert leftovers(cache_dir) == []


def test_one_cancel_stops_a_prefetch_with_worker_processes(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    body = tar_bytes(make_module(tmp_path / "w", weights=400_000))
    urls = [
        server.add(f"/w{i}", body=body, chunk=16 * 1024, stall_at=64 * 1024, stall_for=60)
        for i in range(2)
    ]
    took: list[float] = []

    async def main() -> None:
        async with _hub(cache_dir) as hub:
            task = asyncio.create_task(hub.prefetch(urls, processes=2))
            deadline = time.monotonic() + 60
            while not all(server.gets(f"/w{i}") for i in range(2)):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert psutil.Process().children()  # the downloads run in worker processes
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            took.append(time.monotonic() - t0)

    asyncio.run(main())
    assert took[0] < STOP_WITHIN + 10  # the workers' clean-up, then their exit
    assert psutil.Process().children(recursive=True) == []
    assert leftovers(cache_dir) == []


@pytest.mark.parametrize("kind", ["object", "prefix"])
def test_asyncio_timeout_stops_an_s3_download(
    kind: str, s3: S3Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "s3m", weights=400_000)
    bucket = s3.bucket()
    if kind == "object":
        handle = s3.put(bucket, "m.tar.gz", tar_bytes(module))
    else:
        handle = s3.put_tree(bucket, "m/", module)
    port = int(s3.endpoint.rsplit(":", 1)[1])

    def stall(line: str) -> int | None:  # the big object's answer stops after 64 KiB
        method, target = line.split(" ")[:2]
        big = target.endswith(("m.tar.gz", "variables.data-00000-of-00001"))
        return 64 * 1024 if method == "GET" and big else None

    async def main() -> None:
        async with AsyncHub(
            cache_dir=cache_dir, retries=FAST, s3_options={"endpoint": proxy.url}
        ) as hub:
            async with asyncio.timeout(0.5):
                await hub.resolve(handle)

    with HookProxy(port, stall) as proxy:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            asyncio.run(main())
        assert time.monotonic() - t0 < 0.5 + STOP_WITHIN
        assert proxy.stalled >= 1
    assert leftovers(cache_dir) == []


@pytest.mark.parametrize("helper", ["aresolve", "aload"])
def test_module_level_async_helpers_honour_asyncio_timeout(
    helper: str, stalling: str, cache_dir: Path
) -> None:
    async def main() -> None:
        async with asyncio.timeout(0.5):
            await getattr(asynchub, helper)(stalling)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - t0 < 0.5 + STOP_WITHIN
    assert leftovers(cache_dir) == []


# -- anyio's level-triggered scopes, on both back-ends ----------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_anyio_fail_after_stops_a_download(
    backend: str, call: str, stalling: str, cache_dir: Path
) -> None:
    async def main() -> None:
        async with _hub(cache_dir) as hub:
            with anyio.fail_after(0.5):
                await CALLS[call](hub, stalling)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        anyio.run(main, backend=backend)
    assert time.monotonic() - t0 < 0.5 + STOP_WITHIN
    assert leftovers(cache_dir) == []


# -- Ctrl-C, the way users press it: SIGINT to a process running the call -----------------

_PREAMBLE = """
import asyncio, sys, time, anyio, asynchub
url = sys.argv[1]
def report(event):
    if event.kind.name != "DOWNLOADING":
        print(event.kind.name, event.attempt, repr(event.error), file=sys.stderr, flush=True)
"""

PROGRAMS = {
    "asyncio.run": """
async def main():
    async with asynchub.AsyncHub(progress=report) as hub:
        return await hub.resolve(url)
try:
    print(asyncio.run(main()), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    "anyio.run-asyncio": """
async def main():
    async with asynchub.AsyncHub(progress=report) as hub:
        return await hub.resolve(url)
try:
    print(anyio.run(main, backend="asyncio"), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    "anyio.run-trio": """
async def main():
    async with asynchub.AsyncHub(progress=report) as hub:
        return await hub.resolve(url)
try:
    print(anyio.run(main, backend="trio"), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    "asyncio.run-prefetch": """
async def main():
    async with asynchub.AsyncHub(progress=report) as hub:
        return await hub.prefetch([url])
try:
    print(asyncio.run(main()), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    "asyncio.run-aload": """
async def main():
    async with asynchub.AsyncHub(progress=report) as hub:
        return await hub.load(url)
try:
    print(asyncio.run(main()), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    "sync": """
try:
    with asynchub.Hub(progress=report) as hub:
        print(hub.resolve(url), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
    # A notebook, or async code calling sync code: the sync call runs in the
    # loop's own thread, where asyncio.run turns Ctrl-C into a task cancel.
    "sync-in-running-loop": """
async def main():
    with asynchub.Hub(progress=report) as hub:
        return hub.resolve(url)
try:
    print(asyncio.run(main()), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
""",
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_ctrl_c_stops_a_download(
    program: str, stalling: str, cache_dir: Path, server: Server
) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TFHUB_CACHE_DIR": str(cache_dir)}
    code = textwrap.dedent(_PREAMBLE) + textwrap.dedent(PROGRAMS[program])
    proc = subprocess.Popen(
        [sys.executable, "-c", code, stalling],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Under way: the tmp dir is there and the server has the GET, whose body
        # stalls (for longer than the read timeout, after which a retry would finish).
        deadline = time.monotonic() + 30
        while not (started(cache_dir) and server.gets("/m")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert took < STOP_WITHIN, (took, err)
    assert leftovers(cache_dir) == []
    assert len(server.gets("/m")) == 1  # stopped, not retried
