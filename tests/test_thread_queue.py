"""``in_thread`` (what ``acall`` and unbatched ``serve --infer`` run on): the module's
worker threads, fed from one queue on asyncio.

On asyncio, calls wait in a queue that a worker thread *drains*: one hop to a thread
serves many calls. These tests try to break what that must keep: every caller gets
its own result or error, in its own context; a cancelled call that has not started
never runs, one that runs is waited for; batches of the same module still get their
turn. Each runs on asyncio and trio (where anyio's threads serve each call).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import anyio
import pytest

from asynchub._batching import THREADS, in_thread, loop_threads

pytestmark = pytest.mark.anyio


class _Owner:
    """Whose threads the calls use (a Module in real use; anything weak-referenceable)."""


async def _all_released(owner: object) -> None:
    """Wait (at most 5 s) until no drain holds a slot of ``owner``'s threads.

    A drain gives its slot back on the loop right after its last call; with two drains,
    the one that found the queue empty may do so just after every caller returned.
    """
    limiter = loop_threads(owner)
    with anyio.fail_after(5):
        while limiter.borrowed_tokens:
            await anyio.sleep(0.01)


def _value(i: int) -> int:
    if i % 7 == 3:
        raise ValueError(f"no {i}")
    return i * i


async def test_every_caller_gets_its_own_result_or_error() -> None:
    owner = _Owner()
    got: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            got[i] = await in_thread(owner, _value, i)
        except ValueError as exc:
            got[i] = str(exc)

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    assert got == {i: f"no {i}" if i % 7 == 3 else i * i for i in range(300)}
    await _all_released(owner)


async def test_a_cancelled_call_that_has_not_started_never_runs() -> None:
    owner = _Owner()
    release = threading.Event()
    ran: list[str] = []

    def block(name: str) -> None:
        ran.append(name)
        release.wait(10)

    async with anyio.create_task_group() as tg:
        for i in range(THREADS):  # every thread busy
            tg.start_soon(in_thread, owner, block, f"blocker {i}")
        await anyio.sleep(0.2)
        started = time.perf_counter()
        with anyio.move_on_after(0.1) as scope:
            await in_thread(owner, ran.append, "queued")
        assert scope.cancelled_caught
        # It left at once: it did not wait for a thread to be free.
        assert time.perf_counter() - started < 2
        release.set()
    # And it never ran, then or later; a call after it runs as usual.
    assert await in_thread(owner, _value, 4) == 16
    assert sorted(ran) == [f"blocker {i}" for i in range(THREADS)]
    await _all_released(owner)


async def test_a_cancelled_call_that_runs_is_waited_for_and_returns_nothing() -> None:
    owner = _Owner()
    finished: list[float] = []

    def slow() -> str:
        time.sleep(0.4)
        finished.append(time.perf_counter())
        return "result"

    started = time.perf_counter()
    with anyio.move_on_after(0.05) as scope:
        await in_thread(owner, slow)
        pytest.fail("a cancelled caller got its result")
    assert scope.cancelled_caught
    # Returned only once the call had ended: nothing is left running behind.
    assert finished and time.perf_counter() >= finished[0] >= started + 0.35
    await _all_released(owner)


def test_a_one_shot_asyncio_cancel_of_a_running_call() -> None:
    """asyncio.timeout cancels once (anyio's scopes cancel until the task leaves)."""
    owner = _Owner()
    finished: list[float] = []

    def slow() -> str:
        time.sleep(0.4)
        finished.append(time.perf_counter())
        return "result"

    async def main() -> None:
        async with asyncio.timeout(0.05):
            await in_thread(owner, slow)

    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert finished and finished[0] >= started + 0.35


async def test_each_call_runs_in_its_callers_context() -> None:
    owner = _Owner()
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)

    def read_and_spoil() -> int:
        seen = var.get()
        var.set(10_000)  # stays in the call's copy of the context
        return seen

    async def one(i: int, out: dict[int, int]) -> None:
        var.set(i)
        out[i] = await in_thread(owner, read_and_spoil)
        assert var.get() == i

    out: dict[int, int] = {}
    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(one, i, out)
    assert out == {i: i for i in range(100)}


async def test_batches_of_the_same_module_still_get_their_turn() -> None:
    """Calls queued without end must not keep the threads from a batch waiting for one."""
    owner = _Owner()
    limiter = loop_threads(owner)
    stop = anyio.Event()
    calls = 0

    def work() -> None:
        time.sleep(0.001)

    async def caller() -> None:
        nonlocal calls
        while not stop.is_set():
            await in_thread(owner, work)
            calls += 1

    async def batch() -> float:
        # What Batched does: take a slot of the module's threads, then run.
        token = object()
        started = time.perf_counter()
        await limiter.acquire_on_behalf_of(token)
        waited = time.perf_counter() - started
        limiter.release_on_behalf_of(token)
        return waited

    waits: list[float] = []
    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(caller)
        await anyio.sleep(0.2)
        for _ in range(5):
            waits.append(await batch())
        stop.set()
    assert calls > 0
    # A drain gives its slot up after a turn of calls (64 x ~1 ms here) when a batch waits.
    assert max(waits) < 2.0, waits
    await _all_released(owner)
