"""The async core: resolve handles to complete module directories in the cache."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

import anyio
import httpx
from anyio import to_thread

from ._archive import gzip_backend as find_gzip_backend
from ._config import RUNTIME_OPTIONS, HubConfig, HubOptions
from ._fetch import Events, Fetcher
from ._handles import HandleKind, ParsedHandle, parse
from ._integrity import LockEntry, Pin, parse_digest, read_lock, split_fragment
from ._lookup import accept_for, pin_for
from ._progress import ProgressKind
from ._sources import ObjectStores, net
from ._store import Accept, Record, Store
from ._types import Handle, Processes, ProgressCallback
from .errors import (
    HandleError,
    HubClosedError,
    HubError,
    IntegrityError,
    MissingDependencyError,
    OfflineError,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from ._display import ProgressDisplay
    from ._module import Module

__all__ = ["AsyncHub"]

_URL_MEMO = 4096  # parsed URL handles kept per hub

P = ParamSpec("P")
T = TypeVar("T")

#: The hub whose call the running code is part of (a task group's children inherit it).
_calling: contextvars.ContextVar[AsyncHub | None] = contextvars.ContextVar(
    "asynchub_calling", default=None
)


def _counted(
    method: Callable[Concatenate[AsyncHub, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[AsyncHub, P], Coroutine[Any, Any, T]]:
    """A public call that closing the hub waits for (see :meth:`AsyncHub.aclose`)."""

    async def counted(self: AsyncHub, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._call():
            return await method(self, *args, **kwargs)

    functools.update_wrapper(counted, method)
    return counted


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

    def __init__(self, **options: Unpack[HubOptions]) -> None:
        given: dict[str, Any] = dict(options)
        runtime = {name: given.pop(name) for name in RUNTIME_OPTIONS if name in given}
        self._setup(HubConfig.from_env(**given), **runtime)

    @classmethod
    def from_config(
        cls,
        config: HubConfig,
        progress: ProgressCallback | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        keep_alive: bool = True,
    ) -> AsyncHub:
        """A hub made from a whole config, as it is (a worker process's, say); not yet entered."""
        hub = cls.__new__(cls)
        hub._setup(config, progress=progress, transport=transport, keep_alive=keep_alive)
        return hub

    def _setup(
        self,
        config: HubConfig,
        progress: ProgressCallback | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        keep_alive: bool = True,
    ) -> None:
        self.config = config
        self._lock: dict[str, LockEntry] | None = (
            None if config.lockfile is None else read_lock(config.lockfile)
        )
        #: The hub's s3:// and gs:// stores, made per bucket on first use.
        self.object_stores = ObjectStores(
            s3=config.s3_options, gcs=config.gcs_options, timeouts=config.timeouts
        )
        try:  # a misspelt or missing back-end fails here, not in the middle of a download
            find_gzip_backend(config.gzip_backend)
        except ImportError as exc:
            raise MissingDependencyError(
                f"gzip back-end {config.gzip_backend!r} is not installed ({exc}); "
                'pip install "asynchub[fast]" for isal, or pick another (ASYNCHUB_GZIP)'
            ) from exc
        self._events = Events(progress)
        self._transport = transport
        self._keep_alive = keep_alive
        self._client: httpx.AsyncClient | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._flights: dict[str, _Flight] = {}
        #: The cache dir's store: every lookup, lock and commit goes through it.
        self.store = Store(
            config.cache_dir, stale_after=config.lock_stale_after, lock_timeout=config.lock_timeout
        )
        # Mirrors are normalised here: a malformed one fails when the hub is made.
        self._fetcher = Fetcher(config, self.store, self.object_stores, self._events)
        self._urls: dict[str, ParsedHandle] = {}
        self._display: ProgressDisplay | None = None
        self._state = "new"  # then "open", "closing" (waiting for calls), "closed"
        self._active = 0  # public calls under way
        self._idle: anyio.Event | None = None  # set when the last one ends, while closing

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> AsyncHub:
        if self._state != "new":
            raise HubClosedError("an AsyncHub can be entered once; make a new one")
        t = self.config.timeouts
        limits = httpx.Limits(
            # Room for the ranged requests of one host (HostSlots) besides the downloads.
            max_connections=max(
                10,
                2 * self.config.max_concurrency,
                self.config.max_concurrency + self._fetcher.hosts.per_host,
            ),
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
            transport=self._transport or net.transport(limits),
        )
        self._fetcher.client = self._client
        self._limiter = anyio.CapacityLimiter(self.config.max_concurrency)
        if self._events.callback is None and self.config.progress:
            # TFHUB_DOWNLOAD_PROGRESS (or progress display requested): draw it ourselves.
            from ._display import ProgressDisplay

            self._display = ProgressDisplay()
            self._display.start()
            self._events.callback = self._display
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
        """Close the HTTP connections; the hub cannot be used afterwards.

        Calls already under way (from other tasks, or from other threads
        through the sync :class:`Hub`) are let finish first; new ones are refused.
        """
        if self._state == "open" and self._active and _calling.get() is not self:
            self._state = "closing"
            self._idle = anyio.Event()
            await self._idle.wait()
        self._state = "closed"
        if self._display is not None:
            display, self._display = self._display, None
            display.stop()
        if self._client is not None:
            client, self._client = self._client, None
            self._fetcher.client = None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Count a public call while it runs, so that :meth:`aclose` can wait for it."""
        if _calling.get() is self:  # part of a call already counted (load -> resolve)
            yield
            return
        self._check_open()
        self._active += 1
        token = _calling.set(self)
        try:
            yield
        finally:
            _calling.reset(token)
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The bound on this hub's concurrent downloads (worker processes share it too)."""
        return self._check_open()[1]

    @property
    def progress(self) -> ProgressCallback | None:
        """The callback progress events go to, if any."""
        return self._events.callback

    @property
    def in_process_only(self) -> bool:
        """Whether downloads must stay in this process (so not go to worker processes).

        True for a transport given to this hub (an object of this process), and
        for a config that is not all JSON values; every other option reaches the
        worker processes with the whole config.
        """
        if self._transport is not None:
            return True
        try:  # worker processes are made from the config's JSON
            json.dumps(self.config.to_json())
        except (TypeError, ValueError):  # an object in s3_options, say
            return True
        return False

    def _check_open(self) -> tuple[httpx.AsyncClient, anyio.CapacityLimiter]:
        usable = self._state == "open" or (self._state == "closing" and _calling.get() is self)
        if not usable or self._client is None or self._limiter is None:
            state = "not entered" if self._state == "new" else "closed"
            raise HubClosedError(f"this AsyncHub is {state}; use it inside 'async with AsyncHub()'")
        return self._client, self._limiter

    # -- resolve ---------------------------------------------------------------

    @_counted
    async def resolve(self, handle: Handle, *, digest: str | None = None) -> Path:
        """Return a local directory holding the complete module for ``handle``.

        A local directory is returned as is; an archive or URL is extracted into
        the cache once and reused while complete. ``digest="sha256:<hex>"`` (or
        a ``#sha256=<hex>`` fragment on the handle, or the hub's lock file) pins
        the archive: other bytes raise IntegrityError and nothing is committed,
        and a cached entry made from other bytes is fetched again, into the
        pin's own entry: a path returned for one pin keeps its bytes whatever
        is resolved later. With a lock file the digest may also be the lock
        entry's content digest. Raises a HubError subclass.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            assert parsed.path is not None
            return parsed.path
        return await self._single_flight(parsed, self._pin(parsed, digest))

    @_counted
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
        from ._tf import import_tensorflow_soon

        if "tensorflow" not in sys.modules and await self.lookup(handle) is None:
            # A download: TensorFlow's import (seconds) runs meanwhile, in a thread.
            import_tensorflow_soon()
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

    @_counted  # type: ignore[misc]  # mypy cannot check a decorated overload implementation
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
        (:func:`asynchub._workers.plan_processes`). Cached handles never start one.
        ``digests`` maps handles to the ``"sha256:<hex>"`` each must match
        (a handle with a ``#sha256=`` fragment may be named with or without it).
        """
        from ._prefetch import prefetch

        self._check_open()
        if digests:
            pinned = {str(h): parse_digest(d, handle=str(h)) for h, d in digests.items()}
            handles = [_with_digest(h, pinned) for h in handles]
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

    @_counted
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
        pin = self._pin(parsed, None)
        accept, name = accept_for(pin), None if pin is None else pin.name
        hit = self.store.lookup_inline(parsed.key, parsed.stamp, accept, name)
        if hit is None:
            hit = await to_thread.run_sync(
                self.store.lookup, parsed.key, parsed.stamp, accept, name
            )
        return hit

    def lookup_blocking(self, handle: Handle) -> Path | None:
        """:meth:`lookup`, blocking, from any thread: lets the sync facade answer a hit at once."""
        try:
            parsed = self._parse_url(handle)
            if parsed is None:
                parsed = parse(handle)
            if parsed.kind is HandleKind.DIRECTORY:
                return parsed.path
            pin = self._pin(parsed, None)
        except HubError:
            return None  # the full path raises it, with the hub's context
        name = None if pin is None else pin.name
        return self.store.lookup(parsed.key, parsed.stamp, accept_for(pin), name)

    @_counted
    async def lock_entry(self, handle: Handle) -> LockEntry:
        """What a lock file records of ``handle``: its origin's digests. Used by ``asynchub lock``.

        See :meth:`origin_entry`.
        """
        return (await self.origin_entry(handle))[1]

    @_counted
    async def origin_entry(self, handle: Handle, *, verify: bool = False) -> tuple[Path, LockEntry]:
        """A cached copy of ``handle`` from its origin, and its digests as a lock file records them.

        The digests are the ones computed while the origin's bytes streamed in,
        never the files' as they are now. An entry without both (tensorflow_hub
        wrote it, or it was fetched without file digests) or that came from a
        mirror (its archive is the mirror's re-pack) is fetched again from the
        origin, into an entry of its own: the one other callers were handed is
        left as it is. With ``verify``, the copy's files are hashed too, and a
        copy changed since it was fetched is fetched again (IntegrityError if
        that one is changed as well). Used by ``asynchub lock`` and ``mirror push``.
        """
        self._check_open()
        parsed = await self._parse(handle)
        if parsed.kind is HandleKind.DIRECTORY:
            raise HandleError(
                f"{parsed.text} is a local directory, used in place: it has no archive to lock",
                handle=parsed.text,
            )
        prefix = parsed.kind is HandleKind.PREFIX
        pin = self._pin(parsed, None)  # a #sha256= fragment is checked as in resolve

        def from_origin(record: Record) -> bool:
            return (
                record.mirror is None
                and record.tree_sha256 is not None
                and (prefix or record.sha256 is not None)
                and (pin is None or pin.satisfied_by(record.sha256, record.tree_sha256))
            )

        path = await self._single_flight(parsed, pin, from_origin, file_digests=True)
        if verify:
            record = self.store.record(path.name)
            changed = await to_thread.run_sync(self.store.changed_files, path.name, parsed.text)
            if changed and record is not None:
                stamp = record.stamp

                def unchanged(candidate: Record) -> bool:
                    return from_origin(candidate) and candidate.stamp != stamp

                path = await self._single_flight(parsed, pin, unchanged, file_digests=True)
                changed = await to_thread.run_sync(self.store.changed_files, path.name, parsed.text)
            if changed:
                raise IntegrityError(
                    f"{parsed.text}: the cached copy {path} has been changed since it was "
                    f"fetched ({len(changed)} file(s), e.g. {changed[0]}); remove it "
                    f"('asynchub cache rm {parsed.name}') and try again",
                    handle=parsed.text,
                )
        sha256, size, tree = await to_thread.run_sync(self.store.digests, path.name, parsed.text)
        if tree is None:  # pragma: no cover - from_origin and file_digests=True see to it
            raise IntegrityError(f"{parsed.text}: {path} has no content digest", handle=parsed.text)
        entry = LockEntry(
            handle=parsed.name,
            sha256=None if prefix else sha256,
            size=None if prefix else size,
            tree_sha256=tree,
        )
        return path, entry

    def _pin(self, parsed: ParsedHandle, digest: str | None) -> Pin | None:
        """What the handle's download must match (see :func:`asynchub._lookup.pin_for`)."""
        return pin_for(parsed, digest, self._lock, self.config.lockfile)

    async def _single_flight(
        self,
        parsed: ParsedHandle,
        pin: Pin | None = None,
        accept: Accept | None = None,
        *,
        file_digests: bool = False,
    ) -> Path:
        # Callers with different pins for one key do not share a result; the
        # store's lock still keeps their downloads apart.
        key = parsed.key if pin is None else f"{parsed.key} {pin}"
        if accept is not None:
            key += f" {id(accept)}"
        name = None if pin is None else pin.name
        if key not in self._flights:
            # A hit answered on the loop needs no flight for others to wait on.
            hit = self.store.lookup_inline(
                parsed.key, parsed.stamp, accept or accept_for(pin), name
            )
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
            flight.path = await self._ensure(parsed, pin, accept, file_digests=file_digests)
            return flight.path
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _ensure(
        self,
        parsed: ParsedHandle,
        pin: Pin | None = None,
        accept: Accept | None = None,
        *,
        file_digests: bool = False,
    ) -> Path:
        store = self.store
        accept = accept or accept_for(pin)
        # The handle's entry, then the pin's own (where a pinned download goes
        # when the handle's entry holds other bytes: see Store.commit).
        name = None if pin is None else pin.name
        # The inline look was _single_flight's; this is the full one, in a thread.
        hit = await to_thread.run_sync(store.lookup, parsed.key, parsed.stamp, accept, name)
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
                    parsed.key,
                    handle=parsed.text,
                    source=parsed.stamp,
                    accept=accept,
                    pinned=name,
                ) as claim,
            ):
                if isinstance(claim, Path):  # another process completed it while we waited
                    self._emit(ProgressKind.CACHED, parsed, path=claim)
                    return claim
                path = await self._fetcher.download(parsed, claim, pin, file_digests=file_digests)
        except BaseException as exc:
            self._emit(ProgressKind.FAILED, parsed, error=exc)
            raise
        self._emit(ProgressKind.DONE, parsed, path=path)
        return path

    def _emit(self, kind: ProgressKind, parsed: ParsedHandle, **fields: Any) -> None:
        self._events.emit(kind, parsed, **fields)


def _with_digest(handle: Handle, digests: Mapping[str, str]) -> Handle:
    """``handle`` pinned by its digest in ``digests`` (by its text, or its text less a fragment).

    As a ``#sha256=`` fragment, so whichever process resolves it checks it. A
    fragment already there with the same digest is left alone; one with
    another digest stays beside it, and resolving the handle raises the
    HandleError that says so (``split_fragment``), for this handle alone.
    """
    try:
        text: object = os.fspath(handle)
    except TypeError:  # not a handle: resolving it says so
        return handle
    if not isinstance(text, str):
        return handle
    try:
        base, have = split_fragment(text)
    except HandleError:
        base, have = text, None  # resolving it says what is wrong
    digest = digests.get(text, digests.get(base))
    if digest is None or digest == have:
        return handle
    return f"{text}#sha256={digest}"
