"""How long an event loop goes without running: a heartbeat task beside the work."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


async def largest_gap(work: Callable[[], Awaitable[Any]]) -> float:
    """The longest the loop went without running a 1 ms heartbeat while ``work`` ran."""
    gaps: list[float] = []
    done = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        await anyio.sleep(0.02)
        await work()
        done.set()
    return max(gaps)
