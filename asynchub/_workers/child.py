"""A worker process of ``prefetch(..., processes=N)``: the child side.

Started by :mod:`.parent` with the parent's ``sys.path`` (through
``asynchub._launch.worker``, which calls :func:`main`), or forked by the
command line before it starts a thread (:func:`prefork`); reads the hub's
config and then handles from stdin, one JSON value a line, and writes progress
events and results to stdout (the protocol is :mod:`.wire`'s). The hub itself
is handed in (``make_hub``): this package sits below the hub and never imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import IO, Any

import anyio
from anyio import to_thread
from anyio.abc import TaskGroup

from .._config import HubConfig
from .._progress import ProgressEvent, ProgressKind, silent
from .._types import ProgressCallback
from ..errors import HubError
from .parent import Forked
from .wire import error_to_json, event_to_json, is_end, read_config

__all__ = ["MakeHub", "can_fork", "main", "prefork"]


#: Makes an (unentered) hub from a config and a progress callback: ``AsyncHub.from_config``.
MakeHub = Callable[[HubConfig, ProgressCallback], AbstractAsyncContextManager[Any]]

_EXIT_SIGNALLED = 130
_BYTES_EVERY = 0.05  # seconds between the byte-count events a child sends for one handle
_READ = 64 * 1024  # bytes per read of stdin


class _Writer:
    """JSON lines to the protocol pipe, whole lines only, from any thread.

    A write that fails (the parent is gone: a broken pipe) makes it quiet rather
    than raising into a download: the EOF on stdin that comes with the parent's
    death is what stops the child.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.quiet = False

    def __call__(self, message: Mapping[str, Any]) -> None:
        if self.quiet:
            return
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            try:
                self._out.write(data)
                self._out.flush()
            except OSError:
                self.quiet = True


class _Lines:
    """The lines the parent writes to this child's stdin (``fd``), read on the event loop.

    On POSIX the fd is non-blocking and waited on by the loop, so no thread is
    ever left blocked on it: the child reads on after the end line, to see the
    EOF of a parent that died, and still exits at once when its work is done.
    Elsewhere a worker thread reads, and stops at the end line.
    """

    #: Whether reading on after the end line is possible (see the class docstring).
    watches_after_end = os.name == "posix"

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        if self.watches_after_end:
            os.set_blocking(fd, False)

    async def readline(self) -> bytes:
        """The next whole line; b"" at EOF (a line cut short by it is dropped)."""
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = await self._read()
            if not chunk:
                return b""
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    async def _read(self) -> bytes:
        if not self.watches_after_end:  # pragma: no cover - Windows
            return await to_thread.run_sync(os.read, self._fd, _READ, abandon_on_cancel=True)
        while True:
            try:
                return os.read(self._fd, _READ)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)


async def _child_main(stdin: int, write: _Writer, make_hub: MakeHub) -> int:
    lines = _Lines(stdin)
    first = await lines.readline()
    if not first:
        return 0  # a forked child no prefork took: nothing to do
    config, events = read_config(first)
    # Without progress wanted, a callback even so: the environment must not start a display.
    emit: Callable[[ProgressEvent], None] = silent
    if events:
        sent: dict[str, float] = {}

        def send(event: ProgressEvent) -> None:
            # Byte counts come with every network read: a few a second are enough
            # for a display (the "extracting" event that follows has the final count).
            if event.kind is ProgressKind.DOWNLOADING:
                now = time.monotonic()
                if now - sent.get(event.handle, -_BYTES_EVERY) < _BYTES_EVERY:
                    return
                sent[event.handle] = now
            write(event_to_json(event))

        emit = send

    stopped = False  # by a signal, or by EOF before the end line: the parent is gone
    ended = anyio.Event()  # the parent's end line: no more handles

    async def one(hub: Any, handle: str) -> None:
        try:
            path = await hub.resolve(handle)
        except HubError as exc:
            if exc.handle is None:
                exc.handle = handle
            write({"result": handle, "error": error_to_json(exc)})
        except Exception as exc:  # a bug: the parent raises it
            write({"result": handle, "error": error_to_json(exc)})
        else:
            write({"result": handle, "path": os.fspath(path)})

    def stop(scope: anyio.CancelScope) -> None:
        nonlocal stopped
        stopped = True
        write.quiet = True  # the parent is not listening any more
        scope.cancel()  # the hub's shielded cleanups remove tmp dirs and locks

    async def watch_signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop(scope)
                return

    async def read_handles(hub: Any, work: TaskGroup, scope: anyio.CancelScope) -> None:
        # Reads on after the end line too: EOF while handles are still in flight
        # means the parent died (SIGKILL, say), and its downloads must not go on.
        while True:
            line = await lines.readline()
            if not line:
                stop(scope)
                return
            message = json.loads(line)
            if is_end(message):
                ended.set()
                if not lines.watches_after_end:  # pragma: no cover - Windows
                    return
            elif not ended.is_set():
                work.start_soon(one, hub, message)

    async with make_hub(config, emit) as hub, anyio.create_task_group() as outer:
        if os.name == "posix":
            outer.start_soon(watch_signals, outer.cancel_scope)
        async with anyio.create_task_group() as work:
            outer.start_soon(read_handles, hub, work, outer.cancel_scope)
            await ended.wait()
        outer.cancel_scope.cancel()
    return _EXIT_SIGNALLED if stopped else 0


def _serve(stdin: int, out: IO[bytes], make_hub: MakeHub) -> int:
    write = _Writer(out)
    try:
        code = anyio.run(_child_main, stdin, write, make_hub)
    except KeyboardInterrupt:
        code = _EXIT_SIGNALLED
    out.close()
    return code


def main(make_hub: MakeHub) -> None:
    """A spawned worker's life: the protocol over stdin and stdout, then exit."""
    # Only protocol lines go to the real stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(_serve(sys.stdin.fileno(), out, make_hub))


def can_fork() -> bool:
    """Whether :func:`prefork` may fork now: on Linux, and only while this is the one thread."""
    return sys.platform.startswith("linux") and threading.active_count() == 1


def prefork(count: int, make_hub: MakeHub) -> list[Forked]:
    """Fork ``count`` workers now, for a later ``prefetch(..., processes=N)`` (see :mod:`.parent`).

    Only while this process has one thread and no event loop (:func:`can_fork`):
    the command line calls it first thing. Each child starts a new session (a
    Ctrl-C in the terminal reaches the parent only, which signals its
    children), and ends with ``os._exit``: the parent's atexit handlers and
    buffers are the parent's.
    """
    if not can_fork():
        raise RuntimeError("prefork() needs Linux and a process with no other thread")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # else the children would write the parent's buffered text too
    made: list[Forked] = []
    try:
        for _ in range(count):
            pairs = [socket.socketpair() for _ in range(3)]
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; measured by tests/test_prefork.py
                code = 1
                try:
                    for earlier in made:
                        earlier.close()  # else a sibling's EOF would never come
                    for ours, _theirs in pairs:
                        ours.close()
                    stdin, stdout, stderr = (theirs for _ours, theirs in pairs)
                    code = _forked_main(stdin, stdout, stderr, make_hub)
                except BaseException:
                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stderr.flush()
                    os._exit(code)
            for _ours, theirs in pairs:
                theirs.close()
            (stdin, _), (stdout, _), (stderr, _) = pairs
            made.append(Forked(pid, stdin, stdout, stderr))
    except BaseException:
        for child in made:
            child.close()
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
        raise
    return made


def _forked_main(
    stdin: socket.socket, stdout: socket.socket, stderr: socket.socket, make_hub: MakeHub
) -> int:  # pragma: no cover - runs in a forked child
    os.setsid()
    # The protocol's sockets may have been given fds 0-2, if the parent started
    # with those closed (``<&- >&-`` under some supervisors): move them above
    # before fds 1 and 2 are overwritten, or the child would lose its stdin.
    source, out, err = (_above_stdio(sock.detach()) for sock in (stdin, stdout, stderr))
    os.dup2(err, 2)
    os.dup2(err, 1)  # anything printed goes where the parent captures stderr
    os.close(err)
    try:
        return _serve(source, os.fdopen(out, "wb"), make_hub)
    finally:
        os.close(source)


def _above_stdio(fd: int) -> int:  # pragma: no cover - runs in a forked child
    """``fd``, moved to a number above 2 if it is one of the standard three."""
    if fd > 2:
        return fd
    import fcntl  # POSIX only, like fork

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved
