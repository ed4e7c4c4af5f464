"""A worker process of ``prefetch(..., processes=N)``: the child side.

Started by :mod:`._workers` with the parent's ``sys.path``; reads the hub's
config and then handles from stdin, one JSON value a line, and writes
progress events and results to stdout (the protocol is described there).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any

import anyio
from anyio import to_thread

from ._config import Retries, Timeouts
from ._hub import AsyncHub
from ._progress import ProgressEvent
from ._workers import error_to_json, event_to_json
from .errors import HubError

__all__ = ["main"]

_EXIT_SIGNALLED = 130


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


async def _child_main(stdin: IO[bytes], write: _Writer) -> int:
    config = json.loads(stdin.readline())
    emit: Callable[[ProgressEvent], None] | None = None
    if config.pop("progress"):

        def emit(event: ProgressEvent) -> None:
            write(event_to_json(event))

    else:

        def emit(event: ProgressEvent) -> None:
            pass  # a callback even so: the environment must not start a display here

    config["timeout"] = Timeouts(**config["timeout"])
    config["retries"] = Retries(**config["retries"])
    signalled = False

    async def one(hub: AsyncHub, handle: str) -> None:
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

    async with AsyncHub(progress=emit, **config) as hub, anyio.create_task_group() as outer:
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


def main() -> None:
    # Only protocol lines go to the real stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    write = _Writer(out)
    try:
        code = anyio.run(_child_main, sys.stdin.buffer, write)
    except KeyboardInterrupt:
        code = _EXIT_SIGNALLED
    out.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
