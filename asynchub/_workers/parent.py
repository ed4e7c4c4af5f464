"""The parent side of worker processes: start them, feed them handles, gather their answers.

One process is GIL-bound at about 1.6 cores on loopback (docs/design.md,
"Concurrency and its limit"); ``prefetch(..., processes=N)`` spreads the
downloads over children running :mod:`.child`, started with the parent's
``sys.path`` in its order. The protocol is :mod:`.wire`'s. The child exits
when it has read the end line and its handles are done; EOF on its stdin
before that (this process died, or is stopping it) and SIGINT cancel it (tmp
dirs and locks are removed on the way out), so a child never outlives its
parent's interest in it. Its stderr is captured, and its tail is quoted if it
dies with handles unanswered.

A child is started in one of two ways. By default it is a new interpreter
(``_spawn``): about 0.25 s of start-up and imports each. The command line,
which knows its work before it starts a thread or an event loop, instead forks
its children first thing (:func:`.child.prefork`) and hands them over with
:func:`adopt`: a fork inherits every import, so it starts in milliseconds, and
forking before any thread exists is safe (forking a process with threads
is not: a lock another thread held stays held in the child). Such a child
speaks the same protocol, over socket pairs instead of pipes.

This package never imports the hub: the parent is given a :class:`HubLike`,
and the child's entry point (``asynchub._launch.worker``) hands it the hub class.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
from anyio import to_thread
from anyio.abc import ByteReceiveStream, ByteSendStream, Process, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from .._config import HubConfig
from .._handles import parse
from .._progress import ProgressEvent, ProgressKind, silent
from .._store import Store
from .._types import Handle, ProgressCallback
from ..errors import HubError
from .wire import END_LINE, config_line, error_from_json, event_from_json

__all__ = ["Forked", "HubLike", "adopt", "release", "run"]


class HubLike(Protocol):
    """What prefetch and the worker processes need of a hub (an open AsyncHub)."""

    @property
    def config(self) -> HubConfig: ...
    @property
    def store(self) -> Store: ...
    @property
    def limiter(self) -> anyio.CapacityLimiter: ...
    @property
    def progress(self) -> ProgressCallback | None: ...
    @property
    def in_process_only(self) -> bool: ...
    async def resolve(self, handle: Handle) -> Path: ...
    async def lookup(self, handle: Handle) -> Path | None: ...


_MAX_LINE = 16 * 1024 * 1024
_STDERR_TAIL = 4096  # bytes of a child's stderr kept for error messages
_GRACE = 10.0  # seconds a signalled child may take to clean up before SIGKILL
_EXIT_SIGNALLED = 130
#: The child's first lines: the parent's import path, in its order, then the
#: entry point, which refuses the imports it never uses first (``_launch``).
_BOOT = (
    "import json, sys; "
    "sys.path[:] = json.loads(sys.argv[1]); "
    "from asynchub._launch import refuse_unused; refuse_unused(); "
    "from asynchub._launch import worker; worker()"
)


# -- the parent side -------------------------------------------------------------------------


async def _spawn() -> Process:
    """Start one worker: this interpreter, the inherited environment, this sys.path.

    The path goes as an argument, not PYTHONPATH, so the child's import order is
    exactly the parent's (PYTHONPATH would come before the standard library).
    """
    return await anyio.open_process(
        [sys.executable, "-c", _BOOT, json.dumps(sys.path)],
        # Ctrl-C in a terminal reaches the parent only; the parent signals its children.
        start_new_session=os.name == "posix",
    )


# -- children forked before the event loop (the command line) -------------------------------


@dataclass(eq=False)
class Forked:
    """A worker forked by :func:`.child.prefork`: its pid and this process's ends of its pipes."""

    pid: int
    stdin: socket.socket
    stdout: socket.socket
    stderr: socket.socket
    parent: int = field(default_factory=os.getpid)  # the process that forked it

    def close(self) -> None:
        for sock in (self.stdin, self.stdout, self.stderr):
            sock.close()


_forked: list[Forked] = []


def adopt(children: list[Forked]) -> None:
    """Offer forked children to the next ``prefetch(..., processes=N)`` of this process."""
    _forked.extend(children)


def release(timeout: float = 5.0) -> None:
    """End the forked children no prefetch took: EOF on their stdin, then reap them.

    A child that gets EOF before its config exits at once; one that has not
    after ``timeout`` seconds is killed.
    """
    children = [c for c in _forked if c.parent == os.getpid()]
    _forked.clear()
    for child in children:
        child.close()
    deadline = time.monotonic() + timeout
    for child in children:
        while True:
            try:
                done, _ = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
                break
            time.sleep(0.005)


class _ForkedProcess(Process):
    """anyio's Process interface over a forked child: socket streams, a pidfd to wait on."""

    def __init__(
        self,
        child: Forked,
        stdin: UNIXSocketStream,
        stdout: UNIXSocketStream,
        stderr: UNIXSocketStream,
    ) -> None:
        self._pid = child.pid
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr
        self._returncode: int | None = None
        self._waiting = anyio.Lock()  # one task at a time waits on the pidfd
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+
            self._pidfd = os.pidfd_open(child.pid)

    @classmethod
    async def adopt(cls, child: Forked) -> _ForkedProcess:
        streams = [
            await UNIXSocketStream.from_socket(sock)
            for sock in (child.stdin, child.stdout, child.stderr)
        ]
        return cls(child, *streams)

    def _poll(self) -> int | None:
        if self._returncode is None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:  # pragma: no cover - reaped elsewhere
                self._returncode = -1
            else:
                if pid:
                    self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    async def wait(self) -> int:
        # The pidfd stays open (and readable once the child has exited) until
        # aclose(): a reap through returncode cannot pull it from under a waiter.
        async with self._waiting:
            while (code := self._poll()) is None:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                else:  # pragma: no cover - no pidfd (old kernels)
                    await anyio.sleep(0.02)
            return code

    def send_signal(self, sig: signal.Signals) -> None:
        if self._poll() is not None:
            raise ProcessLookupError(self._pid)
        os.kill(self._pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        for stream in (self._stdin, self._stdout, self._stderr):
            await stream.aclose()
        with anyio.CancelScope(shield=True):
            await self.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._poll()

    @property
    def stdin(self) -> ByteSendStream:
        return self._stdin

    @property
    def stdout(self) -> ByteReceiveStream:
        return self._stdout

    @property
    def stderr(self) -> ByteReceiveStream:
        return self._stderr


async def _start() -> Process:
    """A worker: one this process forked earlier if there is one left, else a new interpreter."""
    while _forked:
        child = _forked.pop(0)
        if child.parent == os.getpid():
            return await _ForkedProcess.adopt(child)
    return await _spawn()


@dataclass(eq=False)
class _Child:
    process: Process
    slots: int
    held: dict[str, object] = field(default_factory=dict)  # handle -> its limiter token
    tail: collections.deque[bytes] = field(default_factory=collections.deque)
    tail_size: int = 0
    alive: bool = True

    def stderr_tail(self) -> str:
        text = b"".join(self.tail).decode("utf-8", "replace").strip()
        return text[-_STDERR_TAIL:]


async def run(
    hub: HubLike,
    handles: list[str],
    processes: int,
    limit: int,
    call_limiter: anyio.CapacityLimiter | None,
    results: dict[str, Path | HubError],
) -> None:
    """Resolve ``handles`` (distinct texts) in up to ``processes`` children into ``results``.

    Each handle dispatched holds a slot of the call's limiter (if any) and of
    the hub's, until its result arrives: the bounds hold across processes.
    """
    hub_limiter = hub.limiter
    store = hub.store
    count = min(processes, len(handles))
    per_child = max(1, math.ceil(limit / count))
    callback = hub.progress
    # A silent callback (the command's --quiet) wants no events: none cross the pipe.
    # The whole config, so every option holds in the children; a silent callback
    # (the command's --quiet) wants no events: none cross the pipe.
    config = config_line(hub.config, per_child, events=callback not in (None, silent))
    children: list[_Child] = []
    # A free slot of a child is its index in this stream; a result gives it back.
    free_send, free_receive = anyio.create_memory_object_stream[int](count * per_child)

    def finish(child: _Child, handle: str, result: Path | HubError) -> None:
        token = child.held.pop(handle)
        results[handle] = result
        hub_limiter.release_on_behalf_of(token)
        if call_limiter is not None:
            call_limiter.release_on_behalf_of(token)

    async def read_stdout(child: _Child, index: int) -> None:
        assert child.process.stdout is not None
        stream = BufferedByteReceiveStream(child.process.stdout)
        while True:
            try:
                line = await stream.receive_until(b"\n", _MAX_LINE)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                break
            message = json.loads(line)
            if "event" in message:
                # "queued" was said by this process when the call began.
                if callback is not None and message["event"] != ProgressKind.QUEUED.value:
                    callback(event_from_json(message))
                continue
            handle = message["result"]
            error = message.get("error")
            if error is None:
                finish(child, handle, Path(message["path"]))
            elif not error.get("hub_error"):
                raise RuntimeError(
                    f"worker process {child.process.pid} failed on {handle}: "
                    f"{error['type']}: {error['message']}"
                )
            else:
                exc = error_from_json(error)
                if exc.handle is None:
                    exc.handle = handle
                finish(child, handle, exc)
            if child.alive:
                free_send.send_nowait(index)
        # EOF: the child has exited, or is about to.
        code = await child.process.wait()
        child.alive = False
        if child.held:
            await to_thread.run_sync(_clean_after, store, child)
            tail = child.stderr_tail()
            detail = f"; its stderr ended with:\n{tail}" if tail else ""
            for handle in list(child.held):
                finish(
                    child,
                    handle,
                    HubError(
                        f"worker process exited with code {code} while resolving {handle}{detail}",
                        handle=handle,
                    ),
                )
        if not any(c.alive for c in children):
            free_send.close()  # no child left to take the rest

    async def read_stderr(child: _Child) -> None:
        assert child.process.stderr is not None
        async for chunk in child.process.stderr:
            child.tail.append(chunk)
            child.tail_size += len(chunk)
            while child.tail_size - len(child.tail[0]) >= _STDERR_TAIL:
                child.tail_size -= len(child.tail.popleft())

    async def free_slot() -> int:
        """The index of a live child with a free slot; -1 once no child is left."""
        while True:
            try:
                index = await free_receive.receive()
            except anyio.EndOfStream:
                return -1
            if children[index].alive:
                return index

    async def dispatch() -> None:
        if callback is not None:
            for handle in handles:
                callback(ProgressEvent(ProgressKind.QUEUED, handle))
        for handle in handles:
            token = object()
            taken: list[anyio.CapacityLimiter] = []
            try:
                for limiter in (call_limiter, hub_limiter):
                    if limiter is not None:
                        await limiter.acquire_on_behalf_of(token)
                        taken.append(limiter)
                index = await free_slot()
            except BaseException:
                for limiter in taken:
                    limiter.release_on_behalf_of(token)
                raise
            if index < 0:
                for limiter in taken:
                    limiter.release_on_behalf_of(token)
                results[handle] = HubError(
                    f"every worker process has exited; {handle} was not resolved", handle=handle
                )
                continue
            child = children[index]
            child.held[handle] = token
            assert child.process.stdin is not None
            # If the child died, its reader reports the handle.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await child.process.stdin.send((json.dumps(handle) + "\n").encode())
        # The orderly end. stdin stays open until the child has exited (_stop closes
        # it), so an EOF before then tells the child this process is gone or stopping it.
        for child in children:
            assert child.process.stdin is not None
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await child.process.stdin.send(END_LINE)

    try:
        with free_send, free_receive:
            for _ in range(count):
                child = _Child(process=await _start(), slots=per_child)
                children.append(child)
                assert child.process.stdin is not None
                # A child that died at once is reported by its reader, with its stderr.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await child.process.stdin.send(config)
            for _ in range(per_child):
                for index in range(count):
                    free_send.send_nowait(index)
            async with anyio.create_task_group() as tg:
                for index, child in enumerate(children):
                    tg.start_soon(read_stdout, child, index, name=f"worker {index} stdout")
                    tg.start_soon(read_stderr, child, name=f"worker {index} stderr")
                tg.start_soon(dispatch, name="worker dispatch")
    finally:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for child in children:
                    tg.start_soon(_stop, child, store)
            for child in children:
                for token in child.held.values():
                    hub_limiter.release_on_behalf_of(token)
                    if call_limiter is not None:
                        call_limiter.release_on_behalf_of(token)
                child.held.clear()


async def _stop(child: _Child, store: Store) -> None:
    """Make sure the child is gone: SIGINT, a grace period, then SIGKILL; tidy after a kill."""
    process = child.process
    try:
        if process.returncode is None:
            with anyio.move_on_after(_GRACE):
                async with anyio.create_task_group() as tg:
                    # Keep reading, so a child writing its last events cannot block.
                    for stream in (process.stdout, process.stderr):
                        if stream is not None:
                            tg.start_soon(_drain, stream)
                    if process.stdin is not None:
                        await process.stdin.aclose()
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
                    await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        child.alive = False
        if child.held:
            await to_thread.run_sync(_clean_after, store, child)
    finally:
        await process.aclose()


async def _drain(stream: ByteReceiveStream) -> None:
    try:
        async for _ in stream:
            pass
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


def _clean_after(store: Store, child: _Child) -> None:
    """Take over the locks, and remove the download dirs, a dead child left behind."""
    for handle in child.held:
        try:
            key = parse(handle).key
        except HubError:
            continue
        store.reap(key)
