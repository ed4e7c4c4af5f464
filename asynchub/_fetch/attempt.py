"""One attempt at an archive: the bytes feed the extraction thread through a bounded stream.

The network task (the producer) stays on the event loop; the extraction thread
pulls ``~chunk_size`` pieces across the thread hop, all that are ready at once,
and writes the members into the claim's download dir (:func:`asynchub._archive.extract`).
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
from anyio import from_thread, to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from .._archive import Manifest, extract
from .._config import HubConfig
from .._handles import ParsedHandle
from .._integrity import Pin
from .._progress import ProgressKind
from .._sources import HttpSource, ObjectSource, Source, Transfer
from .._store import Store
from ..errors import (
    ArchiveError,
    HubError,
    IntegrityError,
    Retry,
    StreamAborted,
    TruncatedArchiveError,
    raise_first,
)
from .events import Events
from .ranged import HostSlots, RangedFetch

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["ArchiveAttempt", "with_handle"]

_STREAM_BUFFER = 4  # pieces (of ~chunk_size) between the network task and the extractor


@dataclass
class ArchiveAttempt:
    """What one attempt needs: the config's limits, the store's guard, the event sink."""

    config: HubConfig
    store: Store
    events: Events
    #: The hub's bound on ranged requests per host, shared by its downloads.
    hosts: HostSlots

    async def run(
        self,
        parsed: ParsedHandle,
        source: Source,
        tmp: Path,
        transfer: Transfer,
        attempt: int,
        file_digests: bool = False,
        pin: Pin | None = None,
        mirror: str | None = None,
        connections: int | None = 1,
    ) -> Manifest:
        """Stream ``source`` into ``tmp``; the manifest of what was written.

        An http(s), s3:// or gs:// archive is fetched over up to ``connections``
        connections (None: decided per archive, :mod:`.ranged`); a local one, or
        with 1, as one stream.
        """
        events = self.events
        send, receive = anyio.create_memory_object_stream[bytes](_STREAM_BUFFER)
        result: list[Manifest] = []
        complete = threading.Event()  # the producer reached the end of the body
        # A pinned size refuses a wrong archive before its bytes are fetched.
        size = None if pin is None or mirror is not None or pin.sha256 is None else pin.size

        async def consume() -> None:
            with receive:
                manifest = await to_thread.run_sync(
                    self._extract_blocking, parsed, receive, complete, tmp, transfer, file_digests
                )
            result.append(manifest)

        def on_resume(error: HubError) -> None:
            events.emit(
                ProgressKind.RETRYING,
                parsed,
                attempt=attempt,
                error=error,
                done=transfer.received,
                total=transfer.total,
            )

        async def deliver(piece: bytes) -> bool:
            """Hand ``piece`` on; False when the extractor stopped (its outcome is the answer)."""
            if size is not None and transfer.total not in (None, size):
                raise IntegrityError(
                    f"{parsed.text}: {source.where} is not the pinned module "
                    f"({transfer.total:,} bytes; the {pin.origin if pin else 'pin'} "
                    f"pins an archive of {size:,}); nothing was committed",
                    handle=parsed.text,
                )
            try:
                await send.send(piece)
            except anyio.BrokenResourceError:
                return False
            events.bytes(parsed, transfer)
            return True

        async def produce() -> None:
            # The stream is closed whichever way this ends, but only a body that
            # reached its end marks it complete: the extractor must not take an
            # aborted producer (a failure, a cancellation) for the end of the archive.
            with send:
                if isinstance(source, (HttpSource, ObjectSource)) and connections != 1:
                    ranged = RangedFetch(
                        source,
                        transfer,
                        on_resume,
                        deliver,
                        connections=connections,
                        tmp=tmp,
                        slot=self.hosts.slot(source.url),
                        on_bytes=lambda: events.bytes(parsed, transfer),
                        guard=lambda: self.store.guard(parsed.text, "keeping early ranges"),
                    )
                    if await ranged.run():
                        complete.set()
                    return
                body = cast("AsyncGenerator[bytes, None]", source.stream(transfer, on_resume))
                async with aclosing(body):
                    async for piece in body:
                        if not await deliver(piece):
                            return
                complete.set()

        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await produce()
            except BaseExceptionGroup as group:
                await raise_first(group)
        except TruncatedArchiveError as exc:
            error = with_handle(exc, parsed, source)
            whole = complete.is_set() and transfer.total is not None
            if source.retry_truncated and not whole:
                # A body without a length that ends early is a cut connection
                # that looked like an end: worth a fresh attempt. One that came
                # whole, as long as announced, would come the same way again.
                raise Retry(error) from exc
            raise error from exc
        except ArchiveError as exc:
            if exc.handle is not None:
                raise
            raise with_handle(exc, parsed, source) from exc
        events.emit(ProgressKind.EXTRACTING, parsed, done=transfer.received, total=transfer.total)
        return result[0]

    def _extract_blocking(
        self,
        parsed: ParsedHandle,
        receive: MemoryObjectReceiveStream[bytes],
        complete: threading.Event,
        tmp: Path,
        transfer: Transfer,
        file_digests: bool = False,
    ) -> Manifest:
        async def take() -> list[bytes]:
            # Everything queued, in one hop to the loop; not joined (a copy for nothing).
            try:
                chunks = [await receive.receive()]
            except anyio.EndOfStream:
                if not complete.is_set():
                    raise StreamAborted(
                        "the network task stopped before the end of the body"
                    ) from None
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
                max_members=self.config.max_extract_members,
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


def with_handle(exc: ArchiveError, parsed: ParsedHandle, source: Source) -> ArchiveError:
    """The same error class, its message prefixed with the handle and where the bytes came from."""
    if exc.handle is not None:
        return exc
    where = "" if source.where == parsed.text else f" ({source.where})"
    return type(exc)(f"{parsed.text}{where}: {exc}", handle=parsed.text)
