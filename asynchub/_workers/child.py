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

from .._config import HubConfig
from .._progress import ProgressEvent, ProgressKind, silent
from .._types import ProgressCallback
from ..errors import HubError
from .parent import Forked
from .wire import error_to_json, event_to_json, read_config

__all__ = ["MakeHub", "can_fork", "main", "prefork"]


#: Makes an (unentered) hub from a config and a progress callback: ``AsyncHub.from_config``.
MakeHub = Callable[[HubConfig, ProgressCallback], AbstractAsyncContextManager[Any]]

_EXIT_SIGNALLED = 130
_BYTES_EVERY = 0.05  # seconds between the byte-count events a child sends for one handle


class _Writer:
    """JSON lines to the protocol pipe, whole lines only, from any thread."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.quiet = False

    def __call__(self, message: Mapping[str, Any]) -> None:
        if self.quiet:
            return
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            self._out.write(data)
            self._out.flush()


async def _child_main(stdin: IO[bytes], write: _Writer, make_hub: MakeHub) -> int:
    first = stdin.readline()
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

    signalled = False

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

    async def watch_signals(scope: anyio.CancelScope) -> None:
        nonlocal signalled
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                signalled = True
                write.quiet = True  # the parent is not listening any more
                scope.cancel()
                return

    async with make_hub(config, emit) as hub, anyio.create_task_group() as outer:
        if os.name == "posix":
            outer.start_soon(watch_signals, outer.cancel_scope)
        async with anyio.create_task_group() as tg:
            while True:
                line = await to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
                if not line:
                    break
                tg.start_soon(one, hub, json.loads(line))
        outer.cancel_scope.cancel()
    return _EXIT_SIGNALLED if signalled else 0


def _serve(stdin: IO[bytes], out: IO[bytes], make_hub: MakeHub) -> int:
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
    sys.exit(_serve(sys.stdin.buffer, out, make_hub))


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
    err = stderr.detach()
    os.dup2(err, 2)
    os.dup2(err, 1)  # anything printed goes where the parent captures stderr
    os.close(err)
    with os.fdopen(stdin.detach(), "rb") as source:
        return _serve(source, os.fdopen(stdout.detach(), "wb"), make_hub)
