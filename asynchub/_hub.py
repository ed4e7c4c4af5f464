"""The async core: resolve handles to complete module directories in the cache."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast, overload

import anyio
import httpx
from anyio import from_thread, to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from ._archive import Manifest, extract
from ._archive import gzip_backend as find_gzip_backend
from ._config import HubConfig, Retries, Timeouts
from ._handles import HandleKind, ParsedHandle, parse
from ._progress import ProgressEvent, ProgressKind
from ._retry import retry_delay
from ._sources import FileSource, HttpSource, Retry, Source, Transfer
from ._store import Claim, Store
from ._types import Handle, ProgressCallback
from .errors import (
    ArchiveError,
    HubClosedError,
    HubError,
    MissingDependencyError,
    OfflineError,
    TruncatedArchiveError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._display import ProgressDisplay
    from ._module import Module

__all__ = ["AsyncHub"]

_STREAM_BUFFER = 4  # pieces (of ~chunk_size) between the network task and the extractor
_URL_MEMO = 4096  # parsed URL handles kept per hub


@dataclass
class _Flight:
    """One download in progress in this process; other callers for the key wait on it."""

    done: anyio.Event
    path: Path | None = None
    error: BaseException | None = None


class AsyncHub:
    """Resolve module handles into a local cache, asynchronously.

    ``async with AsyncHub() as hub: path = await hub.resolve(handle)``. Options
    are keyword-only and fixed when the hub is made; the environment
    (``TFHUB_CACHE_DIR``, ``ASYNCHUB_OFFLINE``, ``TFHUB_DOWNLOAD_PROGRESS``) is
    read then, never at import.
    """

    def __init__(
        self,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: Timeouts | float | None = None,
        retries: Retries | int | None = None,
        headers: Mapping[str, str] | None = None,
        offline: bool | None = None,
        max_concurrency: int | None = None,
        max_extract_bytes: int | None = None,
        lock_stale_after: float | None = None,
        lock_timeout: float | None = None,
        progress: ProgressCallback | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        gzip_backend: str | None = None,
        keep_alive: bool = True,
    ) -> None:
        self.config = HubConfig.from_env(
            cache_dir=cache_dir,
            timeout=timeout,
            retries=retries,
            headers=headers,
            offline=offline,
            max_concurrency=max_concurrency,
            max_extract_bytes=max_extract_bytes,
            lock_stale_after=lock_stale_after,
            lock_timeout=lock_timeout,
            gzip_backend=gzip_backend,
        )
        try:  # a misspelt or missing back-end fails here, not in the middle of a download
            find_gzip_backend(self.config.gzip_backend)
        except ImportError as exc:
            raise MissingDependencyError(
                f"gzip back-end {self.config.gzip_backend!r} is not installed ({exc}); "
                'pip install "asynchub[fast]" for isal, or pick another (ASYNCHUB_GZIP)'
            ) from exc
        self._progress = progress
        self._transport = transport
        self._keep_alive = keep_alive
        self._client: httpx.AsyncClient | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._flights: dict[str, _Flight] = {}
        #: The cache dir's store: every lookup, lock and commit goes through it.
        self.store = Store(
            self.config.cache_dir,
            stale_after=self.config.lock_stale_after,
            lock_timeout=self.config.lock_timeout,
        )
        self._urls: dict[str, ParsedHandle] = {}
        self._display: ProgressDisplay | None = None
        self._state = "new"

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> AsyncHub:
        if self._state != "new":
            raise HubClosedError("an AsyncHub can be entered once; make a new one")
        t = self.config.timeouts
        self._client = httpx.AsyncClient(
            # Redirects are followed by the http source, which keeps configured
            # headers on the origin they were configured for.
            follow_redirects=False,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=None),
            limits=httpx.Limits(
                max_connections=max(10, self.config.max_concurrency * 2),
                # Off for hubs nobody closes (the async helpers' per-loop hubs): no
                # idle connection is then left to be collected with its loop.
                max_keepalive_connections=None if self._keep_alive else 0,
            ),
            transport=self._transport,
        )
        self._limiter = anyio.CapacityLimiter(self.config.max_concurrency)
        if self._progress is None and self.config.progress:
            # TFHUB_DOWNLOAD_PROGRESS (or progress display requested): draw it ourselves.
            from ._display import ProgressDisplay

            self._display = ProgressDisplay()
            self._display.start()
            self._progress = self._display
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections; the hub cannot be used afterwards."""
        self._state = "closed"
        if self._display is not None:
            display, self._display = self._display, None
            display.stop()
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The bound on this hub's concurrent downloads (worker processes share it too)."""
        return self._check_open()[1]

    @property
    def progress(self) -> ProgressCallback | None:
        """The callback progress events go to, if any."""
        return self._progress

    @property
    def custom_transport(self) -> bool:
        """Whether requests go through a transport given to this hub (so not to other processes)."""
        return self._transport is not None

    def _check_open(self) -> tuple[httpx.AsyncClient, anyio.CapacityLimiter]:
        if self._state != "open" or self._client is None or self._limiter is None:
            state = "closed" if self._state == "closed" else "not entered"
            raise HubClosedError(f"this AsyncHub is {state}; use it inside 'async with AsyncHub()'")
        return self._client, self._limiter

    # -- resolve ---------------------------------------------------------------

    async def resolve(self, handle: Handle) -> Path:
        """Return a local directory holding the complete module for ``handle``.

        A local directory is returned as is; an archive or URL is extracted into
        the cache once and reused while complete. Raises a HubError subclass.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            assert parsed.path is not None
            return parsed.path
        return await self._single_flight(parsed)

    async def load(
        self, handle: Handle, *, tags: Iterable[str] | None = None, options: Any = None
    ) -> Module:
        """Resolve ``handle``, then load it with TensorFlow in a worker thread.

        ``tags`` picks the MetaGraph of a SavedModel that has several (e.g.
        ``{"train"}``); ``options`` is a ``tf.saved_model.LoadOptions``.
        """
        from ._module import load_module

        path = await self.resolve(handle)
        text = os.fspath(handle)
        return await to_thread.run_sync(
            functools.partial(load_module, path, handle=text, tags=tags, options=options)
        )

    @overload
    async def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
        processes: int | None = ...,
    ) -> list[Path]: ...

    @overload
    async def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: bool,
        processes: int | None = ...,
    ) -> list[Path | HubError]: ...

    async def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
        processes: int | None = None,
    ) -> list[Path] | list[Path | HubError]:
        """Resolve many handles at once; results in input order.

        A handle given twice is fetched once, cached ones return at once, and one
        failure does not stop the others: when all are done, a PrefetchError lists
        every failed handle (or, with ``return_exceptions=True``, the errors stand
        in the list in place of paths). ``max_concurrency`` bounds this call's
        downloads on top of the hub's own bound. ``processes=N`` (N >= 2) spreads
        the downloads over up to N worker processes, for more than the one core
        a process gets under the GIL; cached handles never start one.
        """
        from ._prefetch import prefetch

        self._check_open()
        return await prefetch(
            self,
            handles,
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
        )

    async def _parse(self, handle: Handle) -> ParsedHandle:
        if isinstance(handle, str) and handle[:8].lower().startswith(("http://", "https://")):
            # Pure string work, so it stays on the loop; remembered, since apps
            # resolve the same few URLs again and again.
            parsed = self._urls.get(handle)
            if parsed is None:
                parsed = parse(handle)
                if len(self._urls) < _URL_MEMO:
                    self._urls[handle] = parsed
            return parsed
        return await to_thread.run_sync(parse, handle)

    async def lookup(self, handle: Handle) -> Path | None:
        """The local module directory for ``handle`` if it needs no download, else None.

        A local directory is returned as is; an archive or URL only when its
        cache entry is complete. Nothing is fetched; a bad handle raises
        HandleError.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            return parsed.path
        hit = self.store.lookup_inline(parsed.key, parsed.stamp)
        if hit is None:
            hit = await to_thread.run_sync(self.store.lookup, parsed.key, parsed.stamp)
        return hit

    def _lookup_blocking(self, handle: Handle) -> Path | None:
        """:meth:`lookup`, blocking, from any thread: lets the sync facade answer a hit at once."""
        try:
            parsed = parse(handle)
        except HubError:
            return None  # the full path raises it, with the hub's context
        if parsed.kind is HandleKind.DIRECTORY:
            return parsed.path
        return self.store.lookup(parsed.key, parsed.stamp)

    async def _single_flight(self, parsed: ParsedHandle) -> Path:
        key = parsed.key
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.path is not None:
                return flight.path
            if flight.error is not None and not isinstance(
                flight.error, anyio.get_cancelled_exc_class()
            ):
                raise flight.error
            # The leader was cancelled: try again, perhaps as the new leader.
        flight = _Flight(done=anyio.Event())
        self._flights[key] = flight
        try:
            flight.path = await self._ensure(parsed)
            return flight.path
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _ensure(self, parsed: ParsedHandle) -> Path:
        store = self.store
        hit = store.lookup_inline(parsed.key, parsed.stamp)
        if hit is None:
            hit = await to_thread.run_sync(store.lookup, parsed.key, parsed.stamp)
        if hit is not None:
            self._emit(ProgressKind.CACHED, parsed, path=hit)
            return hit
        if self.config.offline:
            raise OfflineError(
                f"{parsed.text} is not in the cache {self.config.cache_dir} and offline mode is on "
                "(ASYNCHUB_OFFLINE or offline=True); fetch it once while online, "
                "or point TFHUB_CACHE_DIR at a cache that holds it",
                handle=parsed.text,
            )
        _client, limiter = self._check_open()
        await to_thread.run_sync(store.ensure_root)
        self._emit(ProgressKind.QUEUED, parsed)
        try:
            async with (
                limiter,
                store.acquire(parsed.key, handle=parsed.text, source=parsed.stamp) as claim,
            ):
                if claim is None:  # another process completed it while we waited
                    path = store.entry(parsed.key).module_dir
                    self._emit(ProgressKind.CACHED, parsed, path=path)
                    return path
                path = await self._download(parsed, claim)
        except BaseException as exc:
            self._emit(ProgressKind.FAILED, parsed, error=exc)
            raise
        self._emit(ProgressKind.DONE, parsed, path=path)
        return path

    # -- download and extract ------------------------------------------------

    def _source(self, parsed: ParsedHandle) -> Source:
        if parsed.kind is HandleKind.URL:
            client, _ = self._check_open()
            assert parsed.url is not None
            return HttpSource(
                client,
                parsed.url,
                handle=parsed.text,
                headers=self.config.headers,
                timeouts=self.config.timeouts,
                retries=self.config.retries,
                chunk_size=self.config.chunk_size,
            )
        assert parsed.path is not None
        return FileSource(parsed.path, handle=parsed.text, chunk_size=self.config.chunk_size)

    async def _download(self, parsed: ParsedHandle, claim: Claim) -> Path:
        """Fetch and extract into the claim's download dir, retrying, then commit. Lock held."""
        policy = self.config.retries
        source = self._source(parsed)
        transfer = Transfer()
        for attempt in range(policy.total + 1):
            transfer.restart()
            await to_thread.run_sync(self.store.fresh_tmp, claim, parsed.text)
            try:
                manifest = await self._attempt(parsed, source, claim.tmp, transfer, attempt)
            except Retry as retry:
                if attempt >= policy.total:
                    raise retry.error from retry.__cause__
                delay = retry_delay(attempt, policy, retry_after=retry.retry_after)
                self._emit(ProgressKind.RETRYING, parsed, attempt=attempt + 1, error=retry.error)
                await anyio.sleep(delay)
                continue
            return await to_thread.run_sync(
                functools.partial(
                    self.store.commit, claim, parsed.text, manifest, source=parsed.stamp
                )
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, parsed: ParsedHandle, source: Source, tmp: Path, transfer: Transfer, attempt: int
    ) -> Manifest:
        """One attempt: the source's bytes feed the extraction thread through a bounded stream."""
        send, receive = anyio.create_memory_object_stream[bytes](_STREAM_BUFFER)
        result: list[Manifest] = []

        async def consume() -> None:
            with receive:
                manifest = await to_thread.run_sync(
                    self._extract_blocking, parsed, receive, tmp, transfer
                )
            result.append(manifest)

        def on_resume(error: HubError) -> None:
            self._emit(
                ProgressKind.RETRYING,
                parsed,
                attempt=attempt,
                error=error,
                done=transfer.received,
                total=transfer.total,
            )

        async def produce() -> None:
            async with send:
                body = cast("AsyncGenerator[bytes, None]", source.stream(transfer, on_resume))
                async with aclosing(body):
                    async for piece in body:
                        await send.send(piece)
                        self._emit_bytes(parsed, transfer)

        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await produce()
            except BaseExceptionGroup as group:
                _raise_first(group)
        except TruncatedArchiveError as exc:
            error = _with_handle(exc, parsed, source)
            if source.retry_truncated:
                # A body without a length that ends early is a cut connection
                # that looked like an end: worth a fresh attempt.
                raise Retry(error) from exc
            raise error from exc
        except ArchiveError as exc:
            if exc.handle is not None:
                raise
            raise _with_handle(exc, parsed, source) from exc
        self._emit(ProgressKind.EXTRACTING, parsed, done=transfer.received, total=transfer.total)
        return result[0]

    def _extract_blocking(
        self,
        parsed: ParsedHandle,
        receive: MemoryObjectReceiveStream[bytes],
        tmp: Path,
        transfer: Transfer,
    ) -> Manifest:
        async def take() -> bytes:
            try:
                first = await receive.receive()
            except anyio.EndOfStream:
                return b""
            chunks = [first]
            while True:
                try:
                    chunks.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            return first if len(chunks) == 1 else b"".join(chunks)

        def pull() -> bytes:
            return from_thread.run(take)

        with self.store.guard(parsed.text, "extracting the archive"):
            return extract(
                pull,
                tmp,
                limit=self.config.max_extract_bytes,
                content_type=lambda: transfer.content_type,
                backend=self.config.gzip_backend,
            )

    # -- progress ------------------------------------------------------------

    def _emit(self, kind: ProgressKind, parsed: ParsedHandle, **fields: Any) -> None:
        if self._progress is not None:
            self._progress(ProgressEvent(kind=kind, handle=parsed.text, **fields))

    def _emit_bytes(self, parsed: ParsedHandle, transfer: Transfer) -> None:
        if self._progress is not None:
            self._progress(
                ProgressEvent(
                    ProgressKind.DOWNLOADING,
                    parsed.text,
                    done=transfer.received,
                    total=transfer.total,
                )
            )


def _raise_first(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the error that matters from a task group's group.

    A failure on one side cancels the other, so the group holds the real error
    and perhaps a cancellation; raise the real one, unwrapped.
    """
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, cancelled):
            raise exc
    raise leaves[0] if leaves else group


def _with_handle(exc: ArchiveError, parsed: ParsedHandle, source: Source) -> ArchiveError:
    """The same error class, its message prefixed with the handle and where the bytes came from."""
    if exc.handle is not None:
        return exc
    return type(exc)(f"{parsed.text} ({source.where}): {exc}", handle=parsed.text)
