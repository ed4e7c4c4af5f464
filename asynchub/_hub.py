"""The async core: resolve handles to complete module directories in the cache."""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import sys
import tarfile
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast, overload

import anyio
import httpx
from anyio import from_thread, to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from ._archive import Manifest, check_conflict, check_member, extract
from ._archive import gzip_backend as find_gzip_backend
from ._config import HubConfig, MirrorMismatch, Retries, Timeouts
from ._handles import HandleKind, ParsedHandle, parse
from ._integrity import LockEntry, Pin, parse_digest, read_lock
from ._progress import ProgressEvent, ProgressKind
from ._retry import retry_delay
from ._sources import (
    FileSource,
    HttpSource,
    ObjectPrefix,
    ObjectSource,
    ObjectStores,
    Retry,
    Source,
    Transfer,
    _net,
)
from ._store import Accept, Claim, Record, Store
from ._types import Handle, Processes, ProgressCallback
from .errors import (
    ArchiveError,
    CacheError,
    HandleError,
    HTTPStatusError,
    HubClosedError,
    HubError,
    IntegrityError,
    MissingDependencyError,
    OfflineError,
    TruncatedArchiveError,
    UnsafeArchiveError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._display import ProgressDisplay
    from ._module import Module

__all__ = ["AsyncHub"]

_STREAM_BUFFER = 4  # pieces (of ~chunk_size) between the network task and the extractor
_URL_MEMO = 4096  # parsed URL handles kept per hub
_PREFIX_CONCURRENCY = 8  # objects of one s3:// / gs:// prefix fetched at once


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
        mirrors: Sequence[str] | str | None = None,
        lockfile: str | os.PathLike[str] | None = None,
        on_mirror_mismatch: MirrorMismatch | None = None,
        s3_options: Mapping[str, Any] | None = None,
        gcs_options: Mapping[str, Any] | None = None,
        file_digests: bool | None = None,
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
            mirrors=mirrors,
            lockfile=lockfile,
            on_mirror_mismatch=on_mirror_mismatch,
            s3_options=s3_options,
            gcs_options=gcs_options,
            file_digests=file_digests,
        )
        #: Mirrors as kept (normalised); a malformed one fails here, as does a bad lock file.
        self._mirrors: tuple[str, ...] = ()
        if self.config.mirrors:
            from . import _mirrors  # only with mirrors: it brings the packer and object stores

            self._mirrors = tuple(_mirrors.normalise(m) for m in self.config.mirrors)
        self._lock: dict[str, LockEntry] | None = (
            None if self.config.lockfile is None else read_lock(self.config.lockfile)
        )
        #: The hub's s3:// and gs:// stores, made per bucket on first use.
        self.object_stores = ObjectStores(
            s3=self.config.s3_options,
            gcs=self.config.gcs_options,
            timeouts=self.config.timeouts,
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
        # What worker processes (made from the config's JSON) would not know.
        c = self.config
        self._in_process_only = bool(
            c.mirrors or c.lockfile or c.s3_options or c.gcs_options or c.file_digests
        )

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> AsyncHub:
        if self._state != "new":
            raise HubClosedError("an AsyncHub can be entered once; make a new one")
        t = self.config.timeouts
        limits = httpx.Limits(
            max_connections=max(10, self.config.max_concurrency * 2),
            # Off for hubs nobody closes (the async helpers' per-loop hubs): no
            # idle connection is then left to be collected with its loop.
            max_keepalive_connections=None if self._keep_alive else 0,
        )
        self._client = httpx.AsyncClient(
            # Redirects are followed by the http source, which keeps configured
            # headers on the origin they were configured for.
            follow_redirects=False,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=None),
            limits=limits,
            # Ours unless one was given: larger socket reads, a TLS context per process.
            transport=self._transport or _net.transport(limits),
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
        """Whether downloads must stay in this process (so not go to worker processes).

        True for a transport given to this hub, and for mirrors, a lock file,
        object-store options or file digests, which worker processes are not told.
        """
        return self._transport is not None or self._in_process_only

    def _check_open(self) -> tuple[httpx.AsyncClient, anyio.CapacityLimiter]:
        if self._state != "open" or self._client is None or self._limiter is None:
            state = "closed" if self._state == "closed" else "not entered"
            raise HubClosedError(f"this AsyncHub is {state}; use it inside 'async with AsyncHub()'")
        return self._client, self._limiter

    # -- resolve ---------------------------------------------------------------

    async def resolve(self, handle: Handle, *, digest: str | None = None) -> Path:
        """Return a local directory holding the complete module for ``handle``.

        A local directory is returned as is; an archive or URL is extracted into
        the cache once and reused while complete. ``digest="sha256:<hex>"`` (or
        a ``#sha256=<hex>`` fragment on the handle, or the hub's lock file) pins
        the archive: other bytes raise IntegrityError and nothing is committed,
        and a cached entry made from other bytes is fetched again. Raises a
        HubError subclass.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            assert parsed.path is not None
            return parsed.path
        return await self._single_flight(parsed, self._pin(parsed, digest))

    async def load(
        self,
        handle: Handle,
        *,
        tags: Iterable[str] | None = None,
        options: Any = None,
        digest: str | None = None,
    ) -> Module:
        """Resolve ``handle``, then load it with TensorFlow in a worker thread.

        ``tags`` picks the MetaGraph of a SavedModel that has several (e.g.
        ``{"train"}``); ``options`` is a ``tf.saved_model.LoadOptions``;
        ``digest`` pins the archive as for :meth:`resolve`.
        """
        from ._module import load_module

        path = await self.resolve(handle, digest=digest)
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
        processes: Processes = ...,
        digests: Mapping[str, str] | None = ...,
    ) -> list[Path]: ...

    @overload
    async def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = ...,
        return_exceptions: bool,
        processes: Processes = ...,
        digests: Mapping[str, str] | None = ...,
    ) -> list[Path | HubError]: ...

    async def prefetch(
        self,
        handles: Iterable[Handle],
        *,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
        processes: Processes = None,
        digests: Mapping[str, str] | None = None,
    ) -> list[Path] | list[Path | HubError]:
        """Resolve many handles at once; results in input order.

        A handle given twice is fetched once, cached ones return at once, and one
        failure does not stop the others: when all are done, a PrefetchError lists
        every failed handle (or, with ``return_exceptions=True``, the errors stand
        in the list in place of paths). ``max_concurrency`` bounds this call's
        downloads on top of the hub's own bound. ``processes=N`` (N >= 2) spreads
        the downloads over up to N worker processes, for more than the cores
        one process can use under the GIL; ``processes="auto"`` starts them
        only when the machine and the batch are large enough to gain from them
        (:func:`asynchub._prefetch.plan_processes`). Cached handles never start one.
        ``digests`` maps handles to the ``"sha256:<hex>"`` each must match.
        """
        from ._prefetch import prefetch

        self._check_open()
        if digests:
            # As #sha256= fragments: stripped before the cache key, checked by
            # whichever process resolves the handle.
            pinned = {
                str(h): f"#sha256={parse_digest(d, handle=str(h))}" for h, d in digests.items()
            }
            handles = [
                f"{os.fspath(h)}{pinned[os.fspath(h)]}"
                if isinstance(h, (str, os.PathLike)) and os.fspath(h) in pinned
                else h
                for h in handles
            ]
        return await prefetch(
            self,
            handles,
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            processes=processes,
        )

    def _parse_url(self, handle: Handle) -> ParsedHandle | None:
        """A URL handle parsed, remembered (apps resolve the same few URLs again and
        again); None for any other handle, whose parsing may touch the disk."""
        if not (isinstance(handle, str) and handle[:8].lower().startswith(("http://", "https://"))):
            return None
        parsed = self._urls.get(handle)
        if parsed is None:
            parsed = parse(handle)
            if len(self._urls) < _URL_MEMO:
                self._urls[handle] = parsed
        return parsed

    async def _parse(self, handle: Handle) -> ParsedHandle:
        # A URL is pure string work, so it stays on the loop.
        parsed = self._parse_url(handle)
        return parsed if parsed is not None else await to_thread.run_sync(parse, handle)

    async def lookup(self, handle: Handle) -> Path | None:
        """The local module directory for ``handle`` if it needs no download, else None.

        A local directory is returned as is; an archive or URL only when its
        cache entry is complete (and holds the pinned digest, if one applies).
        Nothing is fetched; a bad handle raises HandleError.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            return parsed.path
        accept = _accept(self._pin(parsed, None))
        hit = self.store.lookup_inline(parsed.key, parsed.stamp, accept)
        if hit is None:
            hit = await to_thread.run_sync(self.store.lookup, parsed.key, parsed.stamp, accept)
        return hit

    def _lookup_blocking(self, handle: Handle) -> Path | None:
        """:meth:`lookup`, blocking, from any thread: lets the sync facade answer a hit at once."""
        try:
            parsed = self._parse_url(handle)
            if parsed is None:
                parsed = parse(handle)
            if parsed.kind is HandleKind.DIRECTORY:
                return parsed.path
            accept = _accept(self._pin(parsed, None))
        except HubError:
            return None  # the full path raises it, with the hub's context
        return self.store.lookup(parsed.key, parsed.stamp, accept)

    async def lock_entry(self, handle: Handle) -> LockEntry:
        """Resolve ``handle`` from its origin and return what a lock file records of it.

        An entry whose record lacks the archive's digest (tensorflow_hub wrote
        it) or that came from a mirror (its digest is the mirror's re-pack's) is
        fetched again from the origin. The content digest is the record's, or
        else computed from the files now. Used by ``asynchub lock``.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            raise HandleError(
                f"{parsed.text} is a local directory, used in place: it has no archive to lock",
                handle=parsed.text,
            )
        prefix = parsed.kind is HandleKind.PREFIX

        def from_origin(record: Record) -> bool:
            return record.mirror is None and (prefix or record.sha256 is not None)

        await self._single_flight(parsed, self._pin(parsed, None), from_origin)
        sha256, size, tree = await to_thread.run_sync(self.store.digests, parsed.key, parsed.text)
        return LockEntry(
            handle=parsed.name,
            sha256=None if prefix else sha256,
            size=None if prefix else size,
            tree_sha256=tree,
        )

    def _pin(self, parsed: ParsedHandle, digest: str | None) -> Pin | None:
        """What the handle's download must match: the argument, the fragment, the lock file.

        Pins that disagree are a HandleError; with a lock file, a handle it does
        not list is refused (IntegrityError). A prefix has no archive: its pin
        is the module's content digest.
        """
        pins: list[Pin] = []
        if digest is not None:
            pins.append(Pin(sha256=parse_digest(digest, handle=parsed.text)))
        if parsed.digest is not None:
            pins.append(Pin(sha256=parsed.digest, origin="#sha256= fragment"))
        if self._lock is not None:
            assert self.config.lockfile is not None
            entry = self._lock.get(parsed.name)
            if entry is None:
                raise IntegrityError(
                    f"{parsed.text} is not in the lock file {self.config.lockfile}, and a hub "
                    "with a lock file fetches nothing unpinned; add it with "
                    f"'asynchub lock {parsed.name} ...'",
                    handle=parsed.text,
                )
            pins.append(entry.pin(self.config.lockfile))
        if not pins:
            return None
        pin = pins[0]
        for other in pins[1:]:
            pin = pin.agree(other, parsed.text)
        if parsed.kind is HandleKind.PREFIX and pin.tree is None:
            pin = Pin(tree=pin.sha256, origin=pin.origin)
        return pin

    async def _single_flight(
        self, parsed: ParsedHandle, pin: Pin | None = None, accept: Accept | None = None
    ) -> Path:
        # Callers with different pins for one key do not share a result; the
        # store's lock still keeps their downloads apart.
        key = parsed.key if pin is None else f"{parsed.key} {pin}"
        if accept is not None:
            key += f" {id(accept)}"
        if key not in self._flights:
            # A hit answered on the loop needs no flight for others to wait on.
            hit = self.store.lookup_inline(parsed.key, parsed.stamp, accept or _accept(pin))
            if hit is not None:
                self._emit(ProgressKind.CACHED, parsed, path=hit)
                return hit
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
            flight.path = await self._ensure(parsed, pin, accept)
            return flight.path
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _ensure(
        self, parsed: ParsedHandle, pin: Pin | None = None, accept: Accept | None = None
    ) -> Path:
        store = self.store
        accept = accept or _accept(pin)
        # The inline look was _single_flight's; this is the full one, in a thread.
        hit = await to_thread.run_sync(store.lookup, parsed.key, parsed.stamp, accept)
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
                store.acquire(
                    parsed.key, handle=parsed.text, source=parsed.stamp, accept=accept
                ) as claim,
            ):
                if claim is None:  # another process completed it while we waited
                    path = store.entry(parsed.key).module_dir
                    self._emit(ProgressKind.CACHED, parsed, path=path)
                    return path
                path = await self._download(parsed, claim, pin)
        except BaseException as exc:
            self._emit(ProgressKind.FAILED, parsed, error=exc)
            raise
        self._emit(ProgressKind.DONE, parsed, path=path)
        return path

    # -- download and extract ------------------------------------------------

    def _source(self, parsed: ParsedHandle) -> Source | ObjectPrefix:
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
        if parsed.kind in (HandleKind.PREFIX, HandleKind.OBJECT):
            assert parsed.url is not None
            kind = ObjectPrefix if parsed.kind is HandleKind.PREFIX else ObjectSource
            return kind(
                self.object_stores,
                parsed.url,
                handle=parsed.text,
                retries=self.config.retries,
                timeouts=self.config.timeouts,
                chunk_size=self.config.chunk_size,
            )
        assert parsed.path is not None
        return FileSource(parsed.path, handle=parsed.text, chunk_size=self.config.chunk_size)

    def _mirror_source(self, parsed: ParsedHandle, mirror: str) -> Source:
        """The source of ``<mirror>/<key>.tar.gz``; a mirror gets none of the configured headers."""
        from . import _mirrors

        where = _mirrors.archive_location(mirror, parsed.key)
        kind = _mirrors.kind_of(mirror)
        if kind == "http":
            client, _ = self._check_open()
            return HttpSource(
                client,
                where,
                handle=parsed.text,
                headers={},
                timeouts=self.config.timeouts,
                retries=self.config.retries,
                chunk_size=self.config.chunk_size,
            )
        if kind in ("s3", "gs"):
            return ObjectSource(
                self.object_stores,
                where,
                handle=parsed.text,
                retries=self.config.retries,
                timeouts=self.config.timeouts,
                chunk_size=self.config.chunk_size,
            )
        return _MirrorFile(Path(where), handle=parsed.text, chunk_size=self.config.chunk_size)

    async def _download(self, parsed: ParsedHandle, claim: Claim, pin: Pin | None) -> Path:
        """Fetch and extract into the claim's download dir, check the pin, commit. Lock held.

        An http(s) handle is looked for at each mirror first, one attempt each:
        a miss or a fault there moves on to the next, and at last to the origin,
        which gets the configured retries. A mirror's copy that fails the pin
        is an IntegrityError, unless ``on_mirror_mismatch="origin"``.
        """
        if parsed.kind is HandleKind.URL:
            for mirror in self._mirrors:
                try:
                    source = self._mirror_source(parsed, mirror)
                    manifest = await self._fetch(parsed, claim, source, pin, 1, mirror=mirror)
                except CacheError:
                    raise  # the cache dir, not the mirror: the origin would fail the same way
                except HubError as exc:  # a miss or a fault: on to the next
                    if not (isinstance(exc, HTTPStatusError) and exc.status == 404):
                        self._emit(ProgressKind.RETRYING, parsed, attempt=0, error=exc)
                    continue
                error = self._check_pin(parsed, source, manifest, pin, mirror)
                if error is None:
                    return await self._commit(parsed, claim, manifest, mirror)
                if self.config.on_mirror_mismatch != "origin":
                    raise error
                self._emit(ProgressKind.RETRYING, parsed, attempt=0, error=error)
        origin = self._source(parsed)
        manifest = await self._fetch(parsed, claim, origin, pin, self.config.retries.total + 1)
        error = self._check_pin(parsed, origin, manifest, pin, None)
        if error is not None:
            raise error
        return await self._commit(parsed, claim, manifest, None)

    def _check_pin(
        self,
        parsed: ParsedHandle,
        source: Source | ObjectPrefix,
        manifest: Manifest,
        pin: Pin | None,
        mirror: str | None,
    ) -> IntegrityError | None:
        if pin is None:
            return None
        problem = pin.problem(
            sha256=manifest.sha256 or None,
            size=manifest.archive_bytes if manifest.sha256 else None,
            tree=manifest.tree_sha256,
            mirror=mirror is not None,
        )
        if problem is None:
            return None
        return IntegrityError(
            f"{parsed.text}: {source.where} is not the pinned module ({problem}; "
            f"pinned by the {pin.origin}); nothing was committed",
            handle=parsed.text,
        )

    async def _commit(
        self, parsed: ParsedHandle, claim: Claim, manifest: Manifest, mirror: str | None
    ) -> Path:
        return await to_thread.run_sync(
            functools.partial(
                self.store.commit, claim, parsed.name, manifest, source=parsed.stamp, mirror=mirror
            )
        )

    async def _fetch(
        self,
        parsed: ParsedHandle,
        claim: Claim,
        source: Source | ObjectPrefix,
        pin: Pin | None,
        attempts: int,
        *,
        mirror: str | None = None,
    ) -> Manifest:
        """Up to ``attempts`` attempts from one source into the claim's download dir."""
        policy = self.config.retries
        transfer = Transfer()
        # The content digest needs every file hashed: for a mirror's re-pack checked
        # against it, for a pin that has nothing else, and when the hub records them.
        digests = self.config.file_digests or (
            pin is not None and pin.tree is not None and (mirror is not None or pin.sha256 is None)
        )
        for attempt in range(attempts):
            transfer.restart()
            await to_thread.run_sync(self.store.fresh_tmp, claim, parsed.text)
            try:
                if isinstance(source, ObjectPrefix):
                    return await self._attempt_prefix(parsed, source, claim.tmp, transfer)
                return await self._attempt(
                    parsed, source, claim.tmp, transfer, attempt, digests, pin, mirror
                )
            except Retry as retry:
                if attempt >= attempts - 1:
                    raise retry.error from retry.__cause__
                delay = retry_delay(attempt, policy, retry_after=retry.retry_after)
                self._emit(ProgressKind.RETRYING, parsed, attempt=attempt + 1, error=retry.error)
                await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self,
        parsed: ParsedHandle,
        source: Source,
        tmp: Path,
        transfer: Transfer,
        attempt: int,
        file_digests: bool = False,
        pin: Pin | None = None,
        mirror: str | None = None,
    ) -> Manifest:
        """One attempt: the source's bytes feed the extraction thread through a bounded stream."""
        send, receive = anyio.create_memory_object_stream[bytes](_STREAM_BUFFER)
        result: list[Manifest] = []
        # A pinned size refuses a wrong archive before its bytes are fetched.
        size = None if pin is None or mirror is not None or pin.sha256 is None else pin.size

        async def consume() -> None:
            with receive:
                manifest = await to_thread.run_sync(
                    self._extract_blocking, parsed, receive, tmp, transfer, file_digests
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
                        if size is not None and transfer.total not in (None, size):
                            raise IntegrityError(
                                f"{parsed.text}: {source.where} is not the pinned module "
                                f"({transfer.total:,} bytes; the {pin.origin if pin else 'pin'} "
                                f"pins an archive of {size:,}); nothing was committed",
                                handle=parsed.text,
                            )
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
        file_digests: bool = False,
    ) -> Manifest:
        async def take() -> list[bytes]:
            # Everything queued, in one hop to the loop; not joined (a copy for nothing).
            try:
                chunks = [await receive.receive()]
            except anyio.EndOfStream:
                return []
            while True:
                try:
                    chunks.append(receive.receive_nowait())
                except (anyio.EndOfStream, anyio.WouldBlock):
                    return chunks

        md5: Any = None
        pulled = False
        taken: collections.deque[bytes] = collections.deque()

        def pull() -> bytes:
            nonlocal md5, pulled
            if not taken:
                taken.extend(from_thread.run(take))
            data = taken.popleft() if taken else b""
            if not pulled:
                # The source learns the server's checksum before its first byte.
                pulled = True
                if transfer.md5 is not None:
                    md5 = hashlib.md5(usedforsecurity=False)
            if md5 is not None:
                md5.update(data)
            return data

        with self.store.guard(parsed.text, "extracting the archive"):
            manifest = extract(
                pull,
                tmp,
                limit=self.config.max_extract_bytes,
                content_type=lambda: transfer.content_type,
                backend=self.config.gzip_backend,
                file_digests=file_digests,
            )
        if md5 is not None and transfer.md5 is not None and md5.digest() != transfer.md5:
            # Bytes hurt on the way (or a stale checksum): another attempt may fix it.
            raise Retry(
                IntegrityError(
                    f"{parsed.text}: the archive's MD5 {md5.hexdigest()} is not the one the "
                    f"server sent ({transfer.md5.hex()} in Content-MD5/x-goog-hash)",
                    handle=parsed.text,
                )
            )
        return manifest

    async def _attempt_prefix(
        self, parsed: ParsedHandle, prefix: ObjectPrefix, tmp: Path, transfer: Transfer
    ) -> Manifest:
        """One attempt at an unpacked module under a prefix: its objects, concurrently, into tmp.

        Object names pass the same checks as archive members before a byte is
        written; each file is hashed as it is written, so the entry gets its
        content digest; an object whose size differs from the listing's (it
        changed meanwhile) or that vanished makes the attempt start over.
        """
        listing = await prefix.list()
        manifest = Manifest(file_sha256={})
        dirs: dict[str, str] = {}
        extracted = 0
        names: dict[str, str] = {}
        try:
            for key in sorted(listing):
                member = tarfile.TarInfo(key)
                member.size = listing[key]
                rel = check_member(member, extracted=extracted, limit=self.config.max_extract_bytes)
                check_conflict(rel, is_dir=False, files=manifest.files, dirs=dirs)
                parent = rel.rpartition("/")[0]
                while parent and parent not in dirs:
                    dirs[parent] = rel
                    parent = parent.rpartition("/")[0]
                manifest.files[rel] = member.size
                names[rel] = key
                extracted += member.size
        except UnsafeArchiveError as exc:
            raise type(exc)(f"{parsed.text} ({prefix.where}): {exc}", handle=parsed.text) from exc
        transfer.total = extracted
        manifest.dirs = set(dirs)
        manifest.archive_bytes = extracted

        def make_dirs() -> None:
            with self.store.guard(parsed.text, "creating the module's directories"):
                for rel in sorted(dirs):
                    (tmp / rel).mkdir(parents=True, exist_ok=True)

        await to_thread.run_sync(make_dirs)
        limiter = anyio.CapacityLimiter(_PREFIX_CONCURRENCY)
        sums: dict[str, str] = {}

        async def fetch(rel: str) -> None:
            async with limiter:
                sums[rel] = await self._fetch_object(
                    parsed, prefix, names[rel], tmp / rel, transfer
                )

        try:
            async with anyio.create_task_group() as tg:
                for rel in manifest.files:
                    tg.start_soon(fetch, rel)
        except BaseExceptionGroup as group:
            _raise_first(group)
        manifest.file_sha256 = sums
        self._emit(ProgressKind.EXTRACTING, parsed, done=transfer.received, total=transfer.total)
        return manifest

    async def _fetch_object(
        self, parsed: ParsedHandle, prefix: ObjectPrefix, key: str, target: Path, total: Transfer
    ) -> str:
        """Stream one object of a prefix into ``target``; its sha256."""
        source = prefix.object(key)
        transfer = Transfer()
        sha = hashlib.sha256()
        guard = functools.partial(self.store.guard, parsed.text, f"writing {target.name}")

        def open_target() -> Any:
            with guard():
                return open(target, "wb")  # closed below, in a worker thread

        def write(fh: Any, data: bytes) -> None:
            with guard():
                sha.update(data)
                fh.write(data)

        def on_resume(error: HubError) -> None:
            self._emit(ProgressKind.RETRYING, parsed, attempt=0, error=error)

        fh = await to_thread.run_sync(open_target)
        try:
            body = cast("AsyncGenerator[bytes, None]", source.stream(transfer, on_resume))
            async with aclosing(body):
                async for piece in body:
                    await to_thread.run_sync(write, fh, piece)
                    total.received += len(piece)
                    self._emit_bytes(parsed, total)
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(fh.close)
        if transfer.received != transfer.total:
            raise Retry(
                HTTPStatusError(
                    f"{parsed.text}: {source.where} changed while the prefix was copied "
                    f"({transfer.received:,} bytes, listed as {transfer.total:,}); starting again",
                    handle=parsed.text,
                    url=source.where,
                    status=412,
                )
            )
        return sha.hexdigest()

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
    where = "" if source.where == parsed.text else f" ({source.where})"
    return type(exc)(f"{parsed.text}{where}: {exc}", handle=parsed.text)


class _MirrorFile(FileSource):
    """A local mirror's archive: like a local archive, but its absence is a 404 (a miss)."""

    async def stream(self, transfer: Transfer, on_resume: Any) -> Any:
        if not await anyio.Path(self.path).is_file():
            raise HTTPStatusError(
                f"{self._handle}: the mirror has no {self.path}",
                handle=self._handle,
                url=str(self.path),
                status=404,
            )
        async for chunk in super().stream(transfer, on_resume):
            yield chunk


def _accept(pin: Pin | None) -> Accept | None:
    """A store ``accept`` that takes only entries recorded with the pinned digest."""
    if pin is None:
        return None

    def accept(record: Record) -> bool:
        return pin.satisfied_by(record.sha256, record.tree_sha256)

    return accept
