"""One attempt at an unpacked module under an ``s3://``/``gs://`` prefix: its objects, at once.

The prefix is listed once per attempt, and that listing is the snapshot the
module is copied from: every object is read only as listed (its size and
ETag: ``If-Match`` on each GET, both checked on each answer), so a prefix that
changes meanwhile ends the attempt (a :class:`Retry` naming the object) and a
retry starts from a fresh listing, in a fresh download dir. Object names pass
the same checks as archive members before a byte is written; folder markers
are directories. Each file is hashed as it is written, so the entry gets its
content digest. All objects count into the attempt's one Transfer and draw on
its one stall budget, which outlives the attempt. The files are written through
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
from .._sources import ObjectPrefix, ObjectSource, Transfer
from .._sources.objstore import Listed, Snapshot
from .._store import Store
from ..errors import HubError, UnsafeArchiveError, raise_first
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
        """Copy the prefix, as one listing saw it, into ``tmp``; what was written.

        ``transfer`` is the download's: its ``received``/``total`` are this
        attempt's bytes of all objects, its stall budget is shared with every
        attempt before and after this one.
        """
        snapshot = await prefix.snapshot(transfer)
        manifest, listed = self._check(parsed, prefix, snapshot)
        transfer.total = manifest.archive_bytes

        def make_dirs() -> None:
            with self.store.guard(parsed.text, "creating the module's directories"):
                for rel in sorted(manifest.dirs):
                    (tmp / rel).mkdir(parents=True, exist_ok=True)

        await to_thread.run_sync(make_dirs)
        limiter = anyio.CapacityLimiter(_PREFIX_CONCURRENCY)
        sums: dict[str, str] = {}

        async def fetch(rel: str) -> None:
            async with limiter:
                source = prefix.object(listed[rel])
                sums[rel] = await self._object(parsed, source, tmp / rel, transfer)

        try:
            async with anyio.create_task_group() as tg:
                for rel in manifest.files:
                    tg.start_soon(fetch, rel)
        except BaseExceptionGroup as group:
            await raise_first(group)
        manifest.file_sha256 = sums
        self.events.emit(
            ProgressKind.EXTRACTING, parsed, done=transfer.received, total=transfer.total
        )
        return manifest

    def _check(
        self, parsed: ParsedHandle, prefix: ObjectPrefix, snapshot: Snapshot
    ) -> tuple[Manifest, dict[str, Listed]]:
        """The manifest the snapshot makes, every name checked as an archive member would be."""
        manifest = Manifest(file_sha256={})
        dirs: dict[str, str] = {}
        extracted = 0
        listed: dict[str, Listed] = {}

        def check(member: tarfile.TarInfo, index: int) -> str:
            return check_member(
                member,
                extracted=extracted,
                limit=self.config.max_extract_bytes,
                index=index,
                max_members=self.config.max_extract_members,
            )

        try:
            for index, key in enumerate(sorted(snapshot.files)):
                member = tarfile.TarInfo(key)
                member.size = snapshot.files[key].size
                rel = check(member, index)
                check_conflict(rel, is_dir=False, files=manifest.files, dirs=dirs)
                _add_parents(rel, dirs)
                manifest.files[rel] = member.size
                listed[rel] = snapshot.files[key]
                extracted += member.size
            for index, key in enumerate(sorted(snapshot.dirs), len(snapshot.files)):
                member = tarfile.TarInfo(key)
                member.type = tarfile.DIRTYPE
                rel = check(member, index)
                check_conflict(rel, is_dir=True, files=manifest.files, dirs=dirs)
                dirs.setdefault(rel, rel)
                _add_parents(rel, dirs)
        except UnsafeArchiveError as exc:
            raise type(exc)(f"{parsed.text} ({prefix.where}): {exc}", handle=parsed.text) from exc
        manifest.dirs = set(dirs)
        manifest.archive_bytes = extracted
        return manifest, listed

    async def _object(
        self, parsed: ParsedHandle, source: ObjectSource, target: Path, transfer: Transfer
    ) -> str:
        """Stream one listed object into ``target``; its sha256."""
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
                    self.events.bytes(parsed, transfer)
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(fh.close)
        return sha.hexdigest()


def _add_parents(rel: str, dirs: dict[str, str]) -> None:
    """Note the directories above ``rel`` (``a/b/c`` makes ``a`` and ``a/b``), as tar would."""
    parent = rel.rpartition("/")[0]
    while parent and parent not in dirs:
        dirs[parent] = rel
        parent = parent.rpartition("/")[0]
