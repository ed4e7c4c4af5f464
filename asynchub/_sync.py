"""The synchronous twin of AsyncHub, and the module-level helpers.

``Hub`` runs one AsyncHub on an event loop in a thread of its own, reached
through an anyio blocking portal: there is no second implementation, and a
sync call works the same from a plain script, from a thread whose event loop
is running (Jupyter, an async web handler calling sync code), and from many
threads at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._hub import AsyncHub
from ._types import Handle
from .errors import HubClosedError, HubError

if TYPE_CHECKING:
    from ._module import Module

__all__ = ["Hub", "aload", "aprefetch", "aresolve", "load", "prefetch", "resolve"]

T = TypeVar("T")

#: How long an interrupted call may take to clean up its tmp dir and lock.
_CLEANUP_WAIT = 60.0


class Hub:
    """Resolve and load modules from synchronous code.

    Takes the same keyword-only options as :class:`AsyncHub`. Use it as a
    context manager, or call :meth:`close` when done; the event loop thread
    starts on first use.
    """

    def __init__(self, *, backend: str = "asyncio", **options: Any) -> None:
        self._hub = AsyncHub(**options)
        self._backend = backend
        self._portal: BlockingPortal | None = None
        self._portal_cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def cache_dir(self) -> Path:
        return self._hub.cache_dir

    @property
    def config(self) -> Any:
        return self._hub.config

    def __enter__(self) -> Hub:
        self._ensure_portal()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the hub's connections and stop its event loop thread."""
        with self._lock:
            self._closed = True
            portal, cm = self._portal, self._portal_cm
            self._portal = self._portal_cm = None
        if portal is not None and cm is not None:
            try:
                portal.call(self._hub.aclose)
            finally:
                cm.__exit__(None, None, None)

    def _ensure_portal(self) -> BlockingPortal:
        with self._lock:
            if self._closed:
                raise HubClosedError("this Hub is closed; make a new one")
            if self._portal is None:
                cm = start_blocking_portal(self._backend, name="asynchub-portal")
                portal = cm.__enter__()
                try:
                    portal.call(self._hub.__aenter__)
                except BaseException:
                    cm.__exit__(None, None, None)
                    raise
                self._portal, self._portal_cm = portal, cm
            return self._portal

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``func`` on the hub's loop and wait; on Ctrl-C, cancel it and let it clean up."""
        portal = self._ensure_portal()
        finished = threading.Event()

        async def run() -> T:
            try:
                return await func(*args, **kwargs)
            finally:
                finished.set()

        future = portal.start_task_soon(run)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt lands here in the caller's thread while the task
            # runs on in the portal's: cancel it and wait for its finally blocks,
            # so no tmp dir or lock outlives the interrupt.
            if not future.done():
                future.cancel()
                finished.wait(_CLEANUP_WAIT)
            raise

    def resolve(self, handle: Handle) -> Path:
        """See :meth:`AsyncHub.resolve`."""
        return self._cached(handle) or self._call(self._hub.resolve, handle)

    def _cached(self, handle: Handle) -> Path | None:
        # A cache hit needs no event loop: answer it in the caller's thread, which
        # may block, and skip two thread hops. With progress reporting on, go
        # through the loop so the "cached" event is reported where events are.
        if self._closed:
            raise HubClosedError("this Hub is closed; make a new one")
        if self._hub._progress is not None or self._hub.config.progress:
            return None
        return self._hub._lookup_blocking(handle)

    def load(
        self, handle: Handle, *, tags: Iterable[str] | None = None, options: Any = None
    ) -> Module:
        """See :meth:`AsyncHub.load`."""
        return self._call(self._hub.load, handle, tags=tags, options=options)

    @overload
    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
        processes: int | None = ...,
    ) -> list[Path]: ...

    @overload
    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: bool,
        processes: int | None = ...,
    ) -> list[Path | HubError]: ...

    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
        processes: int | None = None,
    ) -> list[Path] | list[Path | HubError]:
        """See :meth:`AsyncHub.prefetch`."""
        return self._call(
            self._hub.prefetch,
            list(handles),
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
        )


# -- the default hub behind the module-level helpers ------------------------------

_default: Hub | None = None
_default_key: tuple[str, ...] | None = None
_default_lock = threading.Lock()
_ENV_KEYS = ("TFHUB_CACHE_DIR", "ASYNCHUB_OFFLINE", "TFHUB_DOWNLOAD_PROGRESS")


def default_hub() -> Hub:
    """The shared Hub of the module-level helpers, configured from the environment.

    It is made on first use and made again when one of the variables it reads
    has changed since (so ``os.environ["TFHUB_CACHE_DIR"] = ...`` in a notebook
    takes effect, as it does for tensorflow_hub).
    """
    global _default, _default_key
    key = tuple(os.environ.get(name, "") for name in _ENV_KEYS)
    with _default_lock:
        if _default is not None and _default_key == key:
            return _default
        old, _default, _default_key = _default, Hub(), key
    if old is not None:
        old.close()
    return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        with contextlib.suppress(Exception):
            _default.close()


def resolve(handle: Handle) -> Path:
    """Resolve ``handle`` to a local module directory with the default hub."""
    return default_hub().resolve(handle)


def load(handle: Handle, *, tags: Iterable[str] | None = None, options: Any = None) -> Module:
    """Resolve and load ``handle`` with the default hub: ``m = hub.load(url); y = m(x)``."""
    return default_hub().load(handle, tags=tags, options=options)


def prefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = None,
    return_exceptions: bool = False,
    processes: int | None = None,
) -> list[Path] | list[Path | HubError]:
    """Resolve many handles at once with the default hub."""
    return default_hub().prefetch(
        handles,
        max_concurrency=max_concurrency,
        return_exceptions=return_exceptions,
        processes=processes,
    )


async def aresolve(handle: Handle, **options: Any) -> Path:
    """Async :func:`resolve` on the running loop, with a hub configured from the environment."""
    async with AsyncHub(**options) as hub:
        return await hub.resolve(handle)


async def aload(
    handle: Handle, *, tags: Iterable[str] | None = None, options: Any = None, **hub_options: Any
) -> Module:
    """Async :func:`load`: resolve on the loop, load with TensorFlow in a worker thread."""
    async with AsyncHub(**hub_options) as hub:
        return await hub.load(handle, tags=tags, options=options)


async def aprefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = None,
    return_exceptions: bool = False,
    processes: int | None = None,
    **hub_options: Any,
) -> list[Path] | list[Path | HubError]:
    """Async :func:`prefetch` on the running loop."""
    async with AsyncHub(**hub_options) as hub:
        return await hub.prefetch(
            handles,
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
        )
