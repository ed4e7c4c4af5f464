"""One attempt at an unpacked module under an ``s3://``/``gs://`` prefix: its objects, at once.

Object names pass the same checks as archive members before a byte is
written; each file is hashed as it is written, so the entry gets its content
digest; an object whose size differs from the listing's (it changed meanwhile)
or that vanished makes the attempt start over. The files are written through
the store's guard, so a full disk is the same CacheError as an archive's.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import tarfile
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
from anyio import to_thread

from .._archive import Manifest, check_conflict, check_member
from .._config import HubConfig
from .._handles import ParsedHandle
from .._progress import ProgressKind
from .._sources import ObjectPrefix, Transfer
from .._store import Store
from ..errors import HTTPStatusError, HubError, Retry, UnsafeArchiveError, raise_first
from .events import Events

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["PrefixAttempt"]

_PREFIX_CONCURRENCY = 8  # objects of one prefix fetched at once


@dataclass
class PrefixAttempt:
    config: HubConfig
    store: Store
    events: Events

    async def run(
        self, parsed: ParsedHandle, prefix: ObjectPrefix, tmp: Path, transfer: Transfer
    ) -> Manifest:
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
                sums[rel] = await self._object(parsed, prefix, names[rel], tmp / rel, transfer)

        try:
            async with anyio.create_task_group() as tg:
                for rel in manifest.files:
                    tg.start_soon(fetch, rel)
        except BaseExceptionGroup as group:
            raise_first(group)
        manifest.file_sha256 = sums
        self.events.emit(
            ProgressKind.EXTRACTING, parsed, done=transfer.received, total=transfer.total
        )
        return manifest

    async def _object(
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
            self.events.emit(ProgressKind.RETRYING, parsed, attempt=0, error=error)

        fh = await to_thread.run_sync(open_target)
        try:
            body = cast("AsyncGenerator[bytes, None]", source.stream(transfer, on_resume))
            async with aclosing(body):
                async for piece in body:
                    await to_thread.run_sync(write, fh, piece)
                    total.received += len(piece)
                    self.events.bytes(parsed, total)
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
