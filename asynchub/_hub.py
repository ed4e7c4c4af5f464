"""The async core: resolve handles to complete module directories in the cache."""

from __future__ import annotations

import functools
import os
import sys
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast, overload

import anyio
import httpx
from anyio import from_thread, to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _cache as cache
from ._archive import Manifest, extract
from ._archive import gzip_backend as find_gzip_backend
from ._config import HubConfig, Retries, Timeouts
from ._handles import HandleKind, ParsedHandle, parse
from ._progress import ProgressEvent, ProgressKind
from ._retry import is_retryable_status, parse_retry_after, retry_delay
from ._types import Handle, ProgressCallback
from .errors import (
    ArchiveError,
    HTTPStatusError,
    HubClosedError,
    HubError,
    LockTimeoutError,
    MissingDependencyError,
    NetworkError,
    OfflineError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._display import ProgressDisplay
    from ._module import Module

__all__ = ["AsyncHub"]

_STREAM_BUFFER = 4  # pieces (of ~chunk_size) between the network task and the extractor
_URL_MEMO = 4096  # parsed URL handles kept per hub
_INLINE_CHECKS = 64  # stats a cache hit may make on the loop instead of in a thread
_LOCK_POLL = (0.05, 1.0)  # first and longest wait between looks at another process's lock


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, error: HubError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


@dataclass
class _Flight:
    """One download in progress in this process; other callers for the key wait on it."""

    done: anyio.Event
    path: Path | None = None
    error: BaseException | None = None


class _BodyState:
    """What the network side learnt, for the extraction side's messages."""

    content_type: str | None = None
    received: int = 0
    total: int | None = None


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
        self._client: httpx.AsyncClient | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._flights: dict[str, _Flight] = {}
        self._records: dict[str, cache.Record] = {}
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
            follow_redirects=True,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=None),
            limits=httpx.Limits(max_connections=max(10, self.config.max_concurrency * 2)),
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
        entry = cache.Entry(self.config.cache_dir, parsed.key)
        return await self._single_flight(parsed, entry)

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

    async def _single_flight(self, parsed: ParsedHandle, entry: cache.Entry) -> Path:
        while True:
            flight = self._flights.get(entry.key)
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
        self._flights[entry.key] = flight
        try:
            flight.path = await self._ensure(parsed, entry)
            return flight.path
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[entry.key]
            flight.done.set()

    async def _is_cached(self, entry: cache.Entry) -> bool:
        """Whether the entry is complete; cheap for an entry this hub has verified before.

        The first look reads the record in a worker thread; later looks only
        stat the files it lists, which for a module of a few dozen files costs
        less than the hop to a thread would.
        """
        record = self._records.get(entry.key)
        if record is not None and record.checks <= _INLINE_CHECKS:
            if cache.still_complete(entry, record):
                return True
            del self._records[entry.key]
        record = await to_thread.run_sync(cache.verify, entry)
        if record is None:
            return False
        self._records[entry.key] = record
        return True

    def _lookup_blocking(self, handle: Handle) -> Path | None:
        """The module dir if ``handle`` needs no download, else None; blocking, any thread.

        Lets the sync facade answer a cache hit in the caller's thread.
        """
        try:
            parsed = parse(handle)
        except HubError:
            return None  # the full path raises it, with the hub's context
        if parsed.kind is HandleKind.DIRECTORY:
            return parsed.path
        entry = cache.Entry(self.config.cache_dir, parsed.key)
        record = self._records.get(entry.key)
        if record is None or not cache.still_complete(entry, record):
            record = cache.verify(entry)
            if record is None:
                self._records.pop(entry.key, None)
                return None
            self._records[entry.key] = record
        return entry.module_dir

    async def _ensure(self, parsed: ParsedHandle, entry: cache.Entry) -> Path:
        if await self._is_cached(entry):
            self._emit(ProgressKind.CACHED, parsed, path=entry.module_dir)
            return entry.module_dir
        if self.config.offline:
            raise OfflineError(
                f"{parsed.text} is not in the cache {self.config.cache_dir} and offline mode is on "
                "(ASYNCHUB_OFFLINE or offline=True); fetch it once while online, "
                "or point TFHUB_CACHE_DIR at a cache that holds it",
                handle=parsed.text,
            )
        _client, limiter = self._check_open()
        await to_thread.run_sync(cache.ensure_root, self.config.cache_dir)
        self._emit(ProgressKind.QUEUED, parsed)
        try:
            async with limiter, self._locked(parsed, entry) as owned:
                if not owned:  # another process completed it while we waited
                    self._emit(ProgressKind.CACHED, parsed, path=entry.module_dir)
                    return entry.module_dir
                path = await self._download(parsed, entry, owned)
        except BaseException as exc:
            self._emit(ProgressKind.FAILED, parsed, error=exc)
            raise
        self._emit(ProgressKind.DONE, parsed, path=path)
        return path

    # -- the cross-process lock ----------------------------------------------

    @asynccontextmanager
    async def _locked(self, parsed: ParsedHandle, entry: cache.Entry) -> AsyncIterator[str]:
        """Hold ``<key>.lock`` for the body; yield our lock uid, or "" if the entry got complete."""
        uid = uuid.uuid4().hex
        contents = cache.lock_contents(uid)
        await self._acquire(parsed, entry, contents)
        try:
            if await to_thread.run_sync(cache.is_complete, entry):
                yield ""
            else:
                yield uid
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(cache.release_lock, entry, contents)

    async def _acquire(self, parsed: ParsedHandle, entry: cache.Entry, contents: str) -> None:
        started = anyio.current_time()
        wait = _LOCK_POLL[0]
        seen: str | None = None
        seen_size = -1
        last_growth = started
        while not await to_thread.run_sync(cache.try_acquire, entry, contents):
            text = await to_thread.run_sync(cache.read_lock, entry)
            info = cache.parse_lock(text) if text else None
            now = anyio.current_time()
            if info is not None:
                if cache.holder_is_dead(info):
                    await to_thread.run_sync(cache.break_lock, entry, info.raw)
                    continue
                size = await to_thread.run_sync(cache.tree_size, entry.tmp_dir(info.uid))
                if text != seen or size != seen_size:
                    seen, seen_size, last_growth = text, size, now
                elif now - last_growth >= self.config.lock_stale_after:
                    await to_thread.run_sync(cache.break_lock, entry, info.raw)
                    continue
            timeout = self.config.lock_timeout
            if timeout is not None and now - started >= timeout:
                raise LockTimeoutError(
                    f"{parsed.text}: another process ({text or 'unknown'}) has held "
                    f"{entry.lock} for over {timeout:g}s; wait longer (lock_timeout=) or, "
                    "if that process is gone, delete the lock file",
                    handle=parsed.text,
                )
            await anyio.sleep(wait)
            wait = min(_LOCK_POLL[1], wait * 2)

    # -- download and extract ------------------------------------------------

    async def _download(self, parsed: ParsedHandle, entry: cache.Entry, uid: str) -> Path:
        """Fetch and extract into ``<key>.<uid>.tmp``, retrying, then commit. Lock held."""
        policy = self.config.retries
        tmp = entry.tmp_dir(uid)
        try:
            for attempt in range(policy.total + 1):
                await to_thread.run_sync(cache.remove_tree, tmp)
                await to_thread.run_sync(tmp.mkdir)
                try:
                    manifest = await self._attempt(parsed, tmp, attempt)
                except _Retry as retry:
                    if attempt >= policy.total:
                        raise retry.error from retry.__cause__
                    delay = retry_delay(attempt, policy, retry_after=retry.retry_after)
                    self._emit(
                        ProgressKind.RETRYING, parsed, attempt=attempt + 1, error=retry.error
                    )
                    await anyio.sleep(delay)
                    continue
                await to_thread.run_sync(self._check_module_root, parsed, tmp)
                return await to_thread.run_sync(cache.commit, entry, tmp, parsed.text, manifest)
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(cache.remove_tree, tmp)

    @staticmethod
    def _check_module_root(parsed: ParsedHandle, tmp: Path) -> None:
        if cache.has_saved_model(tmp):
            return
        names = sorted(os.listdir(tmp))
        hint = ""
        if len(names) == 1 and (tmp / names[0]).is_dir() and cache.has_saved_model(tmp / names[0]):
            hint = (
                f"; it holds a single directory {names[0]!r} with the module in it, "
                "but the archive's root must be the module root "
                "(pack it with 'tar -czf m.tar.gz -C DIR .')"
            )
        shown = ", ".join(names[:10]) or "nothing"
        raise ArchiveError(
            f"{parsed.text}: the archive holds no saved_model.pb or saved_model.pbtxt at its root "
            f"(found: {shown}){hint}",
            handle=parsed.text,
        )

    async def _attempt(self, parsed: ParsedHandle, tmp: Path, attempt: int) -> Manifest:
        """One attempt: the network (or file) task feeds the extraction thread."""
        send, receive = anyio.create_memory_object_stream[bytes](_STREAM_BUFFER)
        state = _BodyState()
        result: list[Manifest] = []

        async def consume() -> None:
            with receive:
                manifest = await to_thread.run_sync(self._extract_blocking, receive, tmp, state)
            result.append(manifest)

        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    if parsed.kind is HandleKind.URL:
                        await self._produce_http(parsed, send, state, attempt)
                    else:
                        await self._produce_file(parsed, send, state)
            except BaseExceptionGroup as group:
                _raise_first(group)
        except ArchiveError as exc:
            if exc.handle is not None:
                raise
            raise type(exc)(f"{parsed.text} ({parsed.source}): {exc}", handle=parsed.text) from exc
        self._emit(ProgressKind.EXTRACTING, parsed, done=state.received, total=state.total)
        return result[0]

    def _extract_blocking(
        self, receive: MemoryObjectReceiveStream[bytes], tmp: Path, state: _BodyState
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

        return extract(
            pull,
            tmp,
            limit=self.config.max_extract_bytes,
            content_type=lambda: state.content_type,
            backend=self.config.gzip_backend,
        )

    async def _produce_file(
        self, parsed: ParsedHandle, send: MemoryObjectSendStream[bytes], state: _BodyState
    ) -> None:
        assert parsed.path is not None
        size = self.config.chunk_size
        async with send:
            try:
                state.total = (await anyio.Path(parsed.path).stat()).st_size
                async with await anyio.open_file(parsed.path, "rb") as fh:
                    while chunk := await fh.read(size):
                        state.received += len(chunk)
                        await send.send(chunk)
                        self._emit_bytes(parsed, state)
            except OSError as exc:
                raise ArchiveError(
                    f"{parsed.text}: cannot read {parsed.path}: {exc.strerror}", handle=parsed.text
                ) from exc

    async def _produce_http(
        self,
        parsed: ParsedHandle,
        send: MemoryObjectSendStream[bytes],
        state: _BodyState,
        attempt: int,
    ) -> None:
        """Stream the archive's bytes into ``send``; resume a cut body with Range when possible."""
        client, _ = self._check_open()
        url = parsed.url
        assert url is not None
        validator: str | None = None
        resumable = False
        resumes = 0
        async with send:
            while True:
                headers = {"Accept-Encoding": "identity", **self.config.headers}
                if state.received:
                    headers["Range"] = f"bytes={state.received}-"
                    if validator:
                        headers["If-Range"] = validator
                try:
                    async with client.stream("GET", url, headers=headers) as response:
                        if state.received == 0:
                            self._check_status(parsed, response)
                            state.content_type = response.headers.get("content-type")
                            state.total = _content_length(response)
                            validator = _validator(response)
                            resumable = (
                                response.headers.get("accept-ranges", "").lower() == "bytes"
                                and validator is not None
                            )
                        elif not _resumes_at(response, state.received):
                            raise _Retry(
                                NetworkError(
                                    f"{parsed.text}: the connection to {url} was cut after "
                                    f"{state.received:,} bytes and the server would not resume",
                                    handle=parsed.text,
                                    url=url,
                                )
                            )
                        raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
                        async with aclosing(raw) as body:
                            await self._forward(parsed, body, send, state)
                    return
                except (httpx.TransportError, httpx.StreamError) as exc:
                    error = _network_error(parsed, url, exc, state.received)
                    mid_body = state.received > 0 and isinstance(
                        exc, (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError)
                    )
                    if mid_body and resumable and resumes < self.config.retries.total:
                        resumes += 1
                        self._emit(
                            ProgressKind.RETRYING,
                            parsed,
                            attempt=attempt,
                            error=error,
                            done=state.received,
                            total=state.total,
                        )
                        await anyio.sleep(retry_delay(resumes - 1, self.config.retries))
                        continue
                    raise _Retry(error) from exc

    async def _forward(
        self,
        parsed: ParsedHandle,
        body: AsyncIterator[bytes],
        send: MemoryObjectSendStream[bytes],
        state: _BodyState,
    ) -> None:
        """Pass ``body`` on in pieces of about ``chunk_size`` bytes.

        The network yields ~64 KiB reads; joining them cuts the per-piece costs
        (a hand-off to the extraction thread, a progress event) sixteenfold, and
        those costs hold the GIL that concurrent downloads share. ``received``
        counts only bytes passed on, and what is pending when the body is cut is
        passed on first, so a Range resume starts exactly where they end.
        """
        limit = self.config.chunk_size
        pending: list[bytes] = []
        size = 0

        async def flush() -> None:
            nonlocal size
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            size = 0
            state.received += len(data)
            await send.send(data)
            self._emit_bytes(parsed, state)

        try:
            async for chunk in body:
                pending.append(chunk)
                size += len(chunk)
                if size >= limit:
                    await flush()
        except (httpx.TransportError, httpx.StreamError):
            if pending:
                await flush()
            raise
        if pending:
            await flush()

    @staticmethod
    def _check_status(parsed: ParsedHandle, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300 and status not in (204, 206):
            return
        url = str(response.url)
        reason = response.reason_phrase or ""
        if status == 404:
            advice = "check the handle: no module is published at that URL"
        elif status in (401, 403):
            advice = (
                "the server refused access; pass headers={'Authorization': ...} for private servers"
            )
        elif is_retryable_status(status):
            advice = "the server is failing or busy; try again later"
        else:
            advice = "the server did not return the archive"
        error = HTTPStatusError(
            f"{parsed.text}: {url} answered {status} {reason}; {advice}",
            handle=parsed.text,
            url=url,
            status=status,
        )
        if is_retryable_status(status):
            raise _Retry(error, parse_retry_after(response.headers.get("retry-after")))
        raise error

    # -- progress ------------------------------------------------------------

    def _emit(self, kind: ProgressKind, parsed: ParsedHandle, **fields: Any) -> None:
        if self._progress is not None:
            self._progress(ProgressEvent(kind=kind, handle=parsed.text, **fields))

    def _emit_bytes(self, parsed: ParsedHandle, state: _BodyState) -> None:
        if self._progress is not None:
            self._progress(
                ProgressEvent(
                    ProgressKind.DOWNLOADING, parsed.text, done=state.received, total=state.total
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


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    """A validator usable in If-Range: a strong ETag, else Last-Modified."""
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


def _resumes_at(response: httpx.Response, offset: int) -> bool:
    if response.status_code != 206:
        return False
    content_range = response.headers.get("content-range", "")
    try:
        unit, spec = content_range.split(" ", 1)
        start = int(spec.split("-", 1)[0])
    except ValueError:
        return False
    return unit.lower() == "bytes" and start == offset


def _network_error(parsed: ParsedHandle, url: str, exc: Exception, received: int) -> NetworkError:
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "could not connect"
    elif received:
        what = f"was cut after {received:,} bytes"
    else:
        what = "failed"
    detail = str(exc) or type(exc).__name__
    return NetworkError(
        f"{parsed.text}: the request to {url} {what} ({detail})", handle=parsed.text, url=url
    )
