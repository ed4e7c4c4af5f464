"""The synchronous twin of AsyncHub, and the module-level helpers.

``Hub`` runs one AsyncHub on an event loop in a thread of its own, reached
through an anyio blocking portal: there is no second implementation, and a
sync call works the same from a plain script, from a thread whose event loop
is running (Jupyter, an async web handler calling sync code), from many
threads at once, and in a child of ``fork()`` (multiprocessing's workers on
Linux), which starts a loop of its own.

The async twins ``aresolve``/``aload``/``aprefetch`` share one AsyncHub per
running event loop (and option set), so concurrent calls for one handle make
one download.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import os
import sys
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
)
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal
from anyio.lowlevel import RunVar

from ._config import ENV_PROGRESS, HubConfig, HubOptions, HubOptionsBase, env_flag
from ._hub import AsyncHub
from ._types import Handle, Processes
from .errors import HubClosedError, HubError, cancel_pending

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from ._module import Module

__all__ = ["Hub", "aload", "aprefetch", "aresolve", "load", "prefetch", "resolve"]

T = TypeVar("T")

#: How long an interrupted call may take to clean up its tmp dir and lock.
_CLEANUP_WAIT = 60.0
#: The longest a blocked sync call takes to notice Ctrl-C.
_INTERRUPT_POLL = 0.2


class Hub:
    """Resolve and load modules from synchronous code.

    Takes the same keyword-only options as :class:`AsyncHub`, and ``backend``
    ("asyncio" or "trio") for its event loop. Use it as a context manager, or
    call :meth:`close` when done; the event loop thread starts on first use.
    """

    def __init__(self, *, backend: str = "asyncio", **options: Unpack[HubOptions]) -> None:
        self._options = options
        self._backend = backend
        self._hub = AsyncHub(**options)
        self._portal: BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: The process this hub's loop thread (if any) runs in: see _check_fork.
        self._pid = os.getpid()

    @property
    def cache_dir(self) -> Path:
        return self._hub.cache_dir

    @property
    def config(self) -> HubConfig:
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
        self._check_fork()
        with self._lock:
            self._closed = True
            portal, thread, hub = self._portal, self._thread, self._hub
            self._portal = self._thread = None
        if portal is not None and thread is not None:
            try:
                portal.call(hub.aclose)
            finally:
                _stop_portal(portal, thread)

    def _check_fork(self) -> None:
        """In a child of fork(), leave the parent's loop behind and start afresh.

        The child has no copy of the loop thread, so a call through the inherited
        portal would wait forever, and closing it would too; the AsyncHub's client
        and primitives belong to that loop. They are set aside untouched (kept
        referenced, so no finaliser of theirs runs) for a new AsyncHub with the
        same options; the loop thread starts again on first use.
        """
        if self._pid == os.getpid():
            return
        with _fork_lock:
            if self._pid == os.getpid():
                return
            _inherited.append((self._hub, self._portal, self._thread))
            # Another thread of the parent may have held this lock at the fork.
            self._lock = threading.Lock()
            self._portal = self._thread = None
            # The same cache dir even if TFHUB_CACHE_DIR changed since the hub was made.
            options = self._options.copy()
            if options.get("cache_dir") is None:
                options["cache_dir"] = self._hub.cache_dir
            self._hub = AsyncHub(**options)
            self._pid = os.getpid()  # last: other threads check it before the rest

    def _ensure_portal(self) -> tuple[BlockingPortal, AsyncHub]:
        self._check_fork()
        with self._lock:
            if self._closed:
                raise HubClosedError("this Hub is closed; make a new one")
            if self._portal is None:
                portal, thread = _start_portal(self._backend)
                try:
                    portal.call(self._hub.__aenter__)
                except BaseException:
                    _stop_portal(portal, thread)
                    raise
                self._portal, self._thread = portal, thread
            return self._portal, self._hub

    def _call(self, func: Callable[[AsyncHub], Awaitable[T]]) -> T:
        """Run ``func(hub)`` on the hub's loop and wait; on Ctrl-C, cancel it, let it clean up."""
        portal, hub = self._ensure_portal()
        finished = threading.Event()

        async def run() -> T:
            try:
                return await func(hub)
            finally:
                finished.set()

        future = portal.start_task_soon(run)
        try:
            # Waited for in short steps, not at once: a Ctrl-C that the kernel hands
            # to another thread (or Ray's cancellation, raised asynchronously in this
            # one) only takes effect when this thread runs Python code again, and an
            # untimed wait would run none until the download had finished.
            while True:
                try:
                    return future.result(timeout=_INTERRUPT_POLL)
                except concurrent.futures.TimeoutError:
                    pass
                if cancel_pending():
                    # Called from a coroutine (a notebook cell, async code calling sync
                    # code): asyncio.run turns Ctrl-C into a cancel of the task that is
                    # blocked here, which it cannot deliver until this call returns.
                    # Honour it now, as the task's own await would have.
                    raise asyncio.CancelledError
        except BaseException:
            # KeyboardInterrupt lands here in the caller's thread while the task
            # runs on in the portal's: cancel it and wait for its finally blocks,
            # so no tmp dir or lock outlives the interrupt.
            if not future.done():
                future.cancel()
                finished.wait(_CLEANUP_WAIT)
            raise

    def resolve(self, handle: Handle, *, digest: str | None = None) -> Path:
        """See :meth:`AsyncHub.resolve`."""
        # A pin given here is checked on the loop; one in the handle or lock file, also here.
        hit = self._cached(handle) if digest is None else None
        return hit or self._call(lambda hub: hub.resolve(handle, digest=digest))

    def _cached(self, handle: Handle) -> Path | None:
        # A cache hit needs no event loop: answer it in the caller's thread, which
        # may block, and skip two thread hops. With progress reporting on, go
        # through the loop so the "cached" event is reported where events are.
        self._check_fork()
        if self._closed:
            raise HubClosedError("this Hub is closed; make a new one")
        hub = self._hub
        if hub.progress is not None or hub.config.progress:
            return None
        return hub.lookup_blocking(handle)

    def load(
        self,
        handle: Handle,
        *,
        tags: Iterable[str] | None = None,
        options: Any = None,
        digest: str | None = None,
    ) -> Module:
        """See :meth:`AsyncHub.load`."""
        return self._call(lambda hub: hub.load(handle, tags=tags, options=options, digest=digest))

    @overload
    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
        processes: Processes = ...,
        digests: Mapping[str, str] | None = ...,
    ) -> list[Path]: ...

    @overload
    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: bool,
        processes: Processes = ...,
        digests: Mapping[str, str] | None = ...,
    ) -> list[Path | HubError]: ...

    def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
        processes: Processes = None,
        digests: Mapping[str, str] | None = None,
    ) -> list[Path] | list[Path | HubError]:
        """See :meth:`AsyncHub.prefetch`."""
        handles = list(handles)
        return self._call(
            lambda hub: hub.prefetch(
                handles,
                max_concurrency=max_concurrency,
                return_exceptions=return_exceptions,
                processes=processes,
                digests=digests,
            )
        )


def _start_portal(backend: str) -> tuple[BlockingPortal, threading.Thread]:
    """Start an event loop in a daemon thread, serving a blocking portal until it is stopped.

    What anyio's ``start_blocking_portal`` does, minus its generator: that one's
    finaliser stops the portal and joins the thread, so an inherited copy,
    collected in a child of fork() where the thread does not exist, would hang.
    """
    started: Future[BlockingPortal] = Future()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            started.set_result(portal)
            await portal.sleep_until_stopped()

    def main() -> None:
        try:
            anyio.run(serve, backend=backend)
        except BaseException as exc:
            if not started.done():  # later errors reach callers through their futures
                started.set_exception(exc)

    # From 3.14 a thread may inherit the caller's context; the loop gets a clean one.
    kwargs: dict[str, Any] = (
        {"context": contextvars.Context()} if sys.version_info >= (3, 14) else {}
    )
    thread = threading.Thread(target=main, name="asynchub-portal", daemon=True, **kwargs)
    thread.start()
    try:
        return started.result(), thread
    except BaseException:
        # Interrupted while the loop starts (Ctrl-C): stop it once it has. If it
        # failed to start instead, the thread is ending on its own.
        with contextlib.suppress(BaseException):
            _stop_portal(started.result(), thread)
        raise


def _stop_portal(portal: BlockingPortal, thread: threading.Thread) -> None:
    try:
        with contextlib.suppress(RuntimeError):  # already stopped
            portal.call(portal.stop)
    finally:
        thread.join()


# -- state that a child of fork() must not inherit as is --------------------------

#: Serialises hubs' restarts in a child of fork().
_fork_lock = threading.Lock()
#: What hubs left behind in a child of fork(): never closed, never collected.
_inherited: list[object] = []

_default: Hub | None = None
_default_key: tuple[tuple[str, str], ...] | None = None
_default_lock = threading.Lock()
#: The environment a hub reads when it is made: every variable of ours.
_ENV_PREFIXES = ("TFHUB_", "ASYNCHUB_")


def _after_fork_in_child() -> None:
    # A thread of the parent may have held these at the fork; it does not exist here.
    global _fork_lock, _default_lock
    _fork_lock = threading.Lock()
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_key() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))


# -- the default hub behind the module-level helpers ------------------------------


def default_hub() -> Hub:
    """The shared Hub of the module-level helpers, configured from the environment.

    It is made on first use and made again when one of the variables a hub
    reads (``TFHUB_*``, ``ASYNCHUB_*``) has changed since, so
    ``os.environ["TFHUB_CACHE_DIR"] = ...`` in a notebook takes effect, as it
    does for tensorflow_hub. The hub it replaces is closed in the background
    once the calls other threads are making with it have finished.
    """
    global _default, _default_key
    key = _env_key()
    with _default_lock:
        if _default is not None and _default_key == key:
            return _default
        old, _default, _default_key = _default, Hub(), key
    if old is not None:
        threading.Thread(target=old.close, name="asynchub-close-hub", daemon=True).start()
    return _default


def _with_default(call: Callable[[Hub], T]) -> T:
    """``call(default_hub())``, again with the new default if that one was replaced meanwhile."""
    hub = default_hub()
    try:
        return call(hub)
    except HubClosedError:
        if hub is _default:
            raise
        return call(default_hub())


@atexit.register
def _close_default() -> None:
    if _default is not None:
        with contextlib.suppress(Exception):
            _default.close()


def resolve(handle: Handle, *, digest: str | None = None) -> Path:
    """Resolve ``handle`` to a local module directory with the default hub."""
    return _with_default(lambda hub: hub.resolve(handle, digest=digest))


def load(
    handle: Handle,
    *,
    tags: Iterable[str] | None = None,
    options: Any = None,
    digest: str | None = None,
) -> Module:
    """Resolve and load ``handle`` with the default hub: ``m = hub.load(url); y = m(x)``."""
    return _with_default(lambda hub: hub.load(handle, tags=tags, options=options, digest=digest))


def prefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = None,
    return_exceptions: bool = False,
    processes: Processes = None,
    digests: Mapping[str, str] | None = None,
) -> list[Path] | list[Path | HubError]:
    """Resolve many handles at once with the default hub."""
    handles = list(handles)
    return _with_default(
        lambda hub: hub.prefetch(
            handles,
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
            digests=digests,
        )
    )


# -- the async twins: one hub per running event loop ------------------------------

#: Hubs kept per loop at most; an evicted one needs no closing (see _loop_hub).
_LOOP_HUBS = 8


class _LoopHubs:
    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.hubs: dict[Hashable, AsyncHub] = {}


# Held weakly by the loop (anyio keys run variables by the loop, or trio's run token):
# a finished loop's hubs go with it.
_loop_hubs: RunVar[_LoopHubs] = RunVar("asynchub_loop_hubs")


def _loop_key(options: HubOptionsBase) -> Hashable | None:
    """What tells the loop's hubs apart: the environment they read, and the options given.

    None when the call needs a hub of its own: a progress callback or transport
    belongs to the caller (a hub kept for the loop would hold on to them), and a
    hub that draws the TFHUB_DOWNLOAD_PROGRESS display must stop it when done.
    """
    if options.get("progress") is not None or options.get("transport") is not None:
        return None
    if env_flag(ENV_PROGRESS):
        return None
    given = sorted(
        (name, tuple(sorted(value.items())) if isinstance(value, Mapping) else value)
        for name, value in options.items()
        if value is not None
    )
    key = (_env_key(), tuple(given))
    try:
        hash(key)
    except TypeError:  # an unhashable PathLike, say
        return None
    return key


async def _loop_hub(options: HubOptionsBase) -> AsyncHub | None:
    """The running loop's open hub for ``options``, made on first use; None: make your own.

    Nobody closes it when the loop ends, so it keeps no idle connections: each
    download opens its own (no cost worth saving beside an archive's bytes), and
    nothing is left open to complain when the hub is collected with its loop.
    """
    key = _loop_key(options)
    if key is None:
        return None
    state = _loop_hubs.get(None)
    if state is None:
        state = _LoopHubs()
        _loop_hubs.set(state)
    hub = state.hubs.get(key)
    if hub is not None:
        return hub
    async with state.lock:
        hub = state.hubs.get(key)
        if hub is None:
            options = options.copy()
            options["keep_alive"] = False
            hub = AsyncHub(**options)
            await hub.__aenter__()
            if len(state.hubs) >= _LOOP_HUBS:  # e.g. after the environment changed
                del state.hubs[next(iter(state.hubs))]
            state.hubs[key] = hub
    return hub


@contextlib.asynccontextmanager
async def _hub_for(options: HubOptionsBase) -> AsyncIterator[AsyncHub]:
    hub = await _loop_hub(options)
    if hub is not None:
        yield hub
        return
    async with AsyncHub(**options) as own:
        yield own


async def aresolve(
    handle: Handle, *, digest: str | None = None, **hub_options: Unpack[HubOptions]
) -> Path:
    """Async :func:`resolve` on the running loop, with a hub configured from the environment.

    Calls on one event loop share one AsyncHub (one per set of ``hub_options``
    given), so concurrent calls for a handle make one download. A call given a
    ``progress`` callback or a ``transport`` gets a hub of its own, closed when
    it returns, as does every call while TFHUB_DOWNLOAD_PROGRESS is on.
    """
    async with _hub_for(hub_options) as hub:
        return await hub.resolve(handle, digest=digest)


async def aload(
    handle: Handle,
    *,
    tags: Iterable[str] | None = None,
    options: Any = None,
    digest: str | None = None,
    **hub_options: Unpack[HubOptions],
) -> Module:
    """Async :func:`load`: resolve on the loop, load with TensorFlow in a worker thread.

    The hub is chosen as for :func:`aresolve`.
    """
    async with _hub_for(hub_options) as hub:
        return await hub.load(handle, tags=tags, options=options, digest=digest)


@overload
async def aprefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = ...,
    return_exceptions: Literal[False] = ...,
    processes: Processes = ...,
    **hub_options: Unpack[HubOptionsBase],
) -> list[Path]: ...


@overload
async def aprefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = ...,
    return_exceptions: bool,
    processes: Processes = ...,
    **hub_options: Unpack[HubOptionsBase],
) -> list[Path | HubError]: ...


async def aprefetch(
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = None,
    return_exceptions: bool = False,
    processes: Processes = None,
    **hub_options: Unpack[HubOptionsBase],
) -> list[Path] | list[Path | HubError]:
    """Async :func:`prefetch` on the running loop.

    The hub is chosen as for :func:`aresolve`; ``max_concurrency`` bounds this
    call's downloads.
    """
    async with _hub_for(hub_options) as hub:
        return await hub.prefetch(
            handles,
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
        )
