"""The download pipeline AsyncHub drives, with the entry's lock held: mirrors, then the origin.

Given the config, the store, an HTTP client, the object stores and an event
sink; never reaching back into the hub. Each source gets its attempts (a
mirror one, the origin the configured retries) with back-off between them; an
attempt streams into the claim's fresh download dir (:mod:`.attempt`,
:mod:`.prefix`); the result is checked against the pin and committed by the store.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio import to_thread

from .._archive import Manifest
from .._config import HubConfig
from .._handles import HandleKind, ParsedHandle
from .._integrity import Pin
from .._progress import ProgressKind
from .._retry import retry_delay
from .._sources import (
    FileSource,
    HttpSource,
    ObjectPrefix,
    ObjectSource,
    ObjectStores,
    RangesRefused,
    Source,
    Transfer,
    mirrors,
)
from .._store import Claim, Store
from ..errors import CacheError, HTTPStatusError, HubClosedError, HubError, IntegrityError, Retry
from .attempt import ArchiveAttempt
from .events import Events
from .prefix import PrefixAttempt
from .ranged import HostSlots

__all__ = ["Fetcher"]


class Fetcher:
    """Fetch one handle into a claimed entry: sources, attempts, the pin check, commit."""

    def __init__(
        self,
        config: HubConfig,
        store: Store,
        object_stores: ObjectStores,
        events: Events,
    ) -> None:
        self.config = config
        self.store = store
        self.object_stores = object_stores
        self.events = events
        #: Mirrors as kept (normalised); a malformed one fails here, when the hub is made.
        self.mirrors: Sequence[str] = tuple(mirrors.normalise(m) for m in config.mirrors)
        self.client: httpx.AsyncClient | None = None  # set while the hub is open
        #: Ranged requests at once per host, over all of this hub's downloads.
        self.hosts = HostSlots(config.connections)
        self._archive = ArchiveAttempt(config, store, events, self.hosts)
        self._prefix = PrefixAttempt(config, store, events)

    async def download(
        self, parsed: ParsedHandle, claim: Claim, pin: Pin | None, *, file_digests: bool = False
    ) -> Path:
        """Fetch and extract into the claim's download dir, check the pin, commit. Lock held.

        An http(s) handle is looked for at each mirror first, one attempt each:
        a miss or a fault there (a broken archive, one without a module at its
        root) moves on to the next, and at last to the origin, which gets the
        configured retries. A mirror's copy that fails the pin is an
        IntegrityError, unless ``on_mirror_mismatch="origin"``. ``file_digests``
        hashes every file (the content digest) whatever the config says.
        Returns the committed dir: the claimed entry's, or the pin's own entry
        when the claimed one holds other bytes (:meth:`Store.commit`).
        """
        hashed = file_digests or self.config.file_digests
        if parsed.kind is HandleKind.URL:
            for mirror in self.mirrors:
                try:
                    source = self._mirror_source(parsed, mirror)
                    manifest = await self._fetch(
                        parsed, claim, source, pin, 1, mirror=mirror, file_digests=hashed
                    )
                    # Checked here, not first at commit: a copy packed wrong is a
                    # fault of this mirror, and the next one or the origin may do.
                    await to_thread.run_sync(self.store.check_root, claim, parsed.text)
                except CacheError:
                    raise  # the cache dir, not the mirror: the origin would fail the same way
                except HubError as exc:  # a miss or a fault: on to the next
                    if not (isinstance(exc, HTTPStatusError) and exc.status == 404):
                        self.events.emit(ProgressKind.RETRYING, parsed, attempt=0, error=exc)
                    continue
                error = _check_pin(parsed, source, manifest, pin, mirror)
                if error is None:
                    return await self._commit(parsed, claim, manifest, pin, mirror)
                if self.config.on_mirror_mismatch != "origin":
                    raise error
                self.events.emit(ProgressKind.RETRYING, parsed, attempt=0, error=error)
        origin = self._source(parsed)
        manifest = await self._fetch(
            parsed, claim, origin, pin, self.config.retries.total + 1, file_digests=hashed
        )
        error = _check_pin(parsed, origin, manifest, pin, None)
        if error is not None:
            raise error
        return await self._commit(parsed, claim, manifest, pin, None)

    async def _commit(
        self,
        parsed: ParsedHandle,
        claim: Claim,
        manifest: Manifest,
        pin: Pin | None,
        mirror: str | None,
    ) -> Path:
        # The name of the entry this download goes to if the claimed one holds
        # other bytes: the pin's, else the download's own digest.
        pinned = pin.name if pin is not None else (manifest.tree_sha256 or manifest.sha256 or None)
        return await to_thread.run_sync(
            functools.partial(
                self.store.commit,
                claim,
                parsed.name,
                manifest,
                source=parsed.stamp,
                mirror=mirror,
                pinned=pinned,
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
        file_digests: bool = False,
    ) -> Manifest:
        """Up to ``attempts`` attempts from one source into the claim's download dir."""
        policy = self.config.retries
        transfer = Transfer()
        # The content digest needs every file hashed: whenever the pin has one (a
        # mirror's re-pack is checked against it, and a pin's own entry named by
        # it must hold it, see Pin.name), and when asked for.
        digests = file_digests or (pin is not None and pin.tree is not None)
        connections = self.config.connections
        attempt = 0
        while attempt < attempts:
            transfer.restart()
            await to_thread.run_sync(self.store.fresh_tmp, claim, parsed.text)
            try:
                if isinstance(source, ObjectPrefix):
                    return await self._prefix.run(parsed, source, claim.tmp, transfer)
                return await self._archive.run(
                    parsed, source, claim.tmp, transfer, attempt, digests, pin, mirror, connections
                )
            except RangesRefused as refused:
                # The server sends whole archives to Range requests: one stream,
                # at once, and the attempt is not counted (it was ours to make).
                connections = 1
                self.events.emit(
                    ProgressKind.RETRYING, parsed, attempt=attempt, error=refused.error
                )
                continue
            except Retry as retry:
                if attempt >= attempts - 1:
                    raise retry.error from retry.__cause__
                delay = retry_delay(attempt, policy, retry_after=retry.retry_after)
                self.events.emit(
                    ProgressKind.RETRYING, parsed, attempt=attempt + 1, error=retry.error
                )
                await anyio.sleep(delay)
                attempt += 1
        raise AssertionError("unreachable")  # pragma: no cover

    def _http(self, url: str, parsed: ParsedHandle, headers: dict[str, str]) -> HttpSource:
        if self.client is None:
            raise HubClosedError("the hub is not open")
        c = self.config
        return HttpSource(
            self.client,
            url,
            handle=parsed.text,
            headers=headers,
            timeouts=c.timeouts,
            retries=c.retries,
            chunk_size=c.chunk_size,
        )

    def _object(self, url: str, parsed: ParsedHandle, kind: Any = ObjectSource) -> Any:
        c = self.config
        return kind(
            self.object_stores,
            url,
            handle=parsed.text,
            retries=c.retries,
            timeouts=c.timeouts,
            chunk_size=c.chunk_size,
        )

    def _source(self, parsed: ParsedHandle) -> Source | ObjectPrefix:
        if parsed.kind is HandleKind.URL:
            assert parsed.url is not None
            return self._http(parsed.url, parsed, dict(self.config.headers))
        if parsed.kind in (HandleKind.PREFIX, HandleKind.OBJECT):
            assert parsed.url is not None
            kind = ObjectPrefix if parsed.kind is HandleKind.PREFIX else ObjectSource
            return self._object(parsed.url, parsed, kind)  # type: ignore[no-any-return]
        assert parsed.path is not None
        return FileSource(parsed.path, handle=parsed.text, chunk_size=self.config.chunk_size)

    def _mirror_source(self, parsed: ParsedHandle, mirror: str) -> Source:
        """The source of ``<mirror>/<key>.tar.gz``; a mirror gets none of the configured headers."""
        where = mirrors.archive_location(mirror, parsed.key)
        kind = mirrors.kind_of(mirror)
        if kind == "http":
            return self._http(where, parsed, {})
        if kind in ("s3", "gs"):
            return self._object(where, parsed)  # type: ignore[no-any-return]
        return _MirrorFile(Path(where), handle=parsed.text, chunk_size=self.config.chunk_size)


def _check_pin(
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
