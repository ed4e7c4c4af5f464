"""How long each way of stopping a download takes: ``python -m benchmarks.cancel_latency``.

Not a speed goal (the tests hold the promise: the caller's own exception,
nothing left in the cache): the figures behind "each ends within 1 s". Each
case downloads from a real server on 127.0.0.1 that stalls mid-body for 60 s;
the time is from the cancel (the deadline, the failing sibling, the SIGINT)
to the call's end (for Ctrl-C, to the process's exit).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

import asynchub
import tests.test_cancellation as cases
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server, running

RUNS = 3

Scenario = Callable[[asynchub.AsyncHub, str, Path, dict[str, float]], Awaitable[None]]


async def _timeout(hub: asynchub.AsyncHub, url: str, cache: Path, marks: dict[str, float]) -> None:
    marks["cancel"] = time.monotonic() + 0.5
    async with asyncio.timeout(0.5):
        await hub.resolve(url)


async def _wait_for(hub: asynchub.AsyncHub, url: str, cache: Path, marks: dict[str, float]) -> None:
    marks["cancel"] = time.monotonic() + 0.5
    await asyncio.wait_for(hub.resolve(url), 0.5)


async def _sibling(hub: asynchub.AsyncHub, url: str, cache: Path, marks: dict[str, float]) -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(hub.resolve(url))
        while not cases.started(cache):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        marks["cancel"] = time.monotonic()
        raise ValueError("a sibling fails")


async def _fail_after(
    hub: asynchub.AsyncHub, url: str, cache: Path, marks: dict[str, float]
) -> None:
    marks["cancel"] = time.monotonic() + 0.5
    with anyio.fail_after(0.5):
        await hub.resolve(url)


def _route(server: Server, body: bytes, root: Path) -> tuple[Path, str, str]:
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    path = f"/m{time.monotonic_ns()}"
    url = server.add(path, body=body, chunk=16 * 1024, stall_at=64 * 1024, stall_for=60)
    return cache, url, path


def in_process(
    body: bytes, root: Path, scenario: Scenario, run: Callable[[Any], object]
) -> list[float]:
    took = []
    for _ in range(RUNS):
        with running() as server:
            cache, url, _ = _route(server, body, root)
            marks: dict[str, float] = {}

            async def main(
                url: str = url, cache: Path = cache, marks: dict[str, float] = marks
            ) -> None:
                async with asynchub.AsyncHub(cache_dir=cache) as hub:
                    await scenario(hub, url, cache, marks)

            try:
                run(main)
            except BaseException:
                took.append(time.monotonic() - marks["cancel"])
            else:
                raise AssertionError("the call was not stopped")
            assert cases.leftovers(cache) == []
    return took


def ctrl_c(body: bytes, root: Path, program: str) -> list[float]:
    took = []
    for _ in range(RUNS):
        with running() as server:
            cache, url, path = _route(server, body, root)
            env = {**os.environ, "PYTHONPATH": os.getcwd(), "TFHUB_CACHE_DIR": str(cache)}
            code = textwrap.dedent(cases._PREAMBLE) + textwrap.dedent(cases.PROGRAMS[program])
            proc = subprocess.Popen(
                [sys.executable, "-c", code, url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            while not (cases.started(cache) and server.gets(path)):
                time.sleep(0.005)
            time.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            took.append(time.monotonic() - t0)
            assert proc.returncode == 130
            assert cases.leftovers(cache) == []
    return took


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        body = tar_bytes(make_module(root / "module", weights=400_000))
        rows: list[tuple[str, list[float]]] = [
            ("asyncio.timeout around resolve", in_process(body, root, _timeout, _asyncio)),
            ("asyncio.wait_for around resolve", in_process(body, root, _wait_for, _asyncio)),
            ("a failing asyncio.TaskGroup sibling", in_process(body, root, _sibling, _asyncio)),
            ("anyio.fail_after, asyncio", in_process(body, root, _fail_after, _anyio("asyncio"))),
            ("anyio.fail_after, trio", in_process(body, root, _fail_after, _anyio("trio"))),
        ]
        rows += [(f"Ctrl-C: {p} (to exit)", ctrl_c(body, root, p)) for p in sorted(cases.PROGRAMS)]
    for label, took in rows:
        runs = ", ".join(f"{t * 1000:.0f}" for t in took)
        print(f"{label:45s} max {max(took) * 1000:5.0f} ms   runs: {runs}")


def _asyncio(main: Callable[[], Any]) -> object:
    return asyncio.run(main())


def _anyio(backend: str) -> Callable[[Callable[[], Any]], object]:
    return lambda main: anyio.run(main, backend=backend)


if __name__ == "__main__":
    main()
