"""The store: an entry's whole life — lookup, acquire, commit, cleanup.

Every "is it cached?" in asynchub (the async path, the sync fast path,
prefetch, worker processes, the ``cache`` commands) is :meth:`Store.lookup`,
and every "may I take this lock?" is :func:`.locks.verdict`. This is also the
one place where OSError becomes :class:`CacheError`: a full disk, a read-only
or foreign-owned cache dir, a download dir removed under us.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio import to_thread

from .._integrity import tree_digest
from ..errors import ArchiveError, CacheError, LockTimeoutError
from . import layout, locks
from .layout import Entry, Record, SourceStamp

if TYPE_CHECKING:
    from .._archive import Manifest

__all__ = ["Accept", "Claim", "Store", "cache_error"]

#: Stats a memoised cache hit may make on the event loop instead of in a thread.
INLINE_CHECKS = 64
_POLL = (0.05, 1.0)  # first and longest wait between looks at another process's lock
_MEMO = 4096  # records remembered per store
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Whether a complete entry's record is acceptable (e.g. it holds a pinned digest).
Accept = Callable[[Record], bool]
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Claim:
    """The lock on one key, held by this process: download into ``tmp``, then commit."""

    entry: Entry
    uid: str
    contents: str

    @property
    def tmp(self) -> Path:
        return self.entry.tmp_dir(self.uid)


def cache_error(exc: OSError, root: Path, handle: str | None, doing: str) -> CacheError:
    """The CacheError a failed file operation in the cache dir stands for."""
    where = f"{handle}: " if handle else ""
    path = exc.filename or root
    if exc.errno in _FULL:
        message = (
            f"{where}no space left on the device holding the cache dir {root} while {doing}; "
            "free some space (asynchub cache prune) or point TFHUB_CACHE_DIR elsewhere"
        )
    elif exc.errno in _DENIED:
        message = (
            f"{where}cannot write to the cache dir {root} while {doing} ({exc.strerror}: {path}); "
            "make it writable, or pass cache_dir= / set TFHUB_CACHE_DIR to a writable directory"
        )
    else:
        message = f"{where}{doing} in the cache dir {root} failed: {exc.strerror or exc} ({path})"
    return CacheError(message, handle=handle)


class Store:
    """One cache dir. Blocking methods may run in any thread; ``acquire`` is async."""

    def __init__(
        self, root: Path, *, stale_after: float = 600.0, lock_timeout: float | None = None
    ) -> None:
        self.root = root
        self.stale_after = stale_after
        self.lock_timeout = lock_timeout
        self._memo: dict[str, Record] = {}

    def entry(self, key: str) -> Entry:
        return Entry(self.root, key)

    @contextlib.contextmanager
    def guard(self, handle: str | None, doing: str) -> Iterator[None]:
        """Turn an OSError raised in the body into a CacheError naming ``handle``."""
        try:
            yield
        except OSError as exc:
            raise cache_error(exc, self.root, handle, doing) from exc

    # -- lookup ----------------------------------------------------------------

    def lookup(
        self, key: str, source: SourceStamp | None = None, accept: Accept | None = None
    ) -> Path | None:
        """The module dir if the entry is complete (and from ``source``, if given), else None.

        ``accept`` may refuse a complete entry's record (one that lacks a pinned
        digest): that is a miss too, and a download replaces the entry.
        Blocking. A record verified before is re-checked with one stat per file.
        """
        entry = self.entry(key)
        record = self._memo.get(key)
        if record is not None and _fits(record, source) and layout.still_complete(entry, record):
            return entry.module_dir if accept is None or accept(record) else None
        try:
            record = layout.verify(entry)
        except OSError:
            record = None
        if record is None or not _fits(record, source):
            self._memo.pop(key, None)
            return None
        if len(self._memo) >= _MEMO:
            self._memo.clear()
        self._memo[key] = record
        return entry.module_dir if accept is None or accept(record) else None

    def lookup_inline(
        self, key: str, source: SourceStamp | None = None, accept: Accept | None = None
    ) -> Path | None:
        """A cache hit answered cheaply enough for the event loop, else None (ask lookup).

        Only an entry verified before, with a few files, is checked here: a
        stat per file costs less than the hop to a worker thread.
        """
        record = self._memo.get(key)
        if record is None or record.checks > INLINE_CHECKS or not _fits(record, source):
            return None
        if accept is not None and not accept(record):
            return None
        entry = self.entry(key)
        return entry.module_dir if layout.still_complete(entry, record) else None

    def record(self, key: str) -> Record | None:
        """The verified record of a complete entry (after a lookup), else None."""
        return self._memo.get(key)

    def digests(self, key: str, handle: str) -> tuple[str | None, int | None, str]:
        """A complete entry's ``(archive sha256, archive bytes, content digest)``.

        The content digest is the record's, else computed from the files now
        (reading every byte once). Blocking; CacheError if the entry is not complete.
        """
        entry = self.entry(key)
        with self.guard(handle, "reading the entry's digests"):
            data = layout.read_manifest(entry) or {}
            record = self._memo.get(key)
            if record is None or not layout.still_complete(entry, record):
                raise CacheError(f"{handle}: the entry {entry.module_dir} is not complete")
            tree = data.get("tree_sha256")
            if not isinstance(tree, str):
                sums = layout.hash_files(entry, [rel for rel, _ in record.files])
                tree = tree_digest(dict(record.files), sums)
        size = data.get("archive_bytes")
        return record.sha256, size if isinstance(size, int) else None, tree

    def ensure_root(self) -> None:
        with self.guard(None, "creating it"):
            self.root.mkdir(parents=True, exist_ok=True)

    # -- the lock --------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        key: str,
        *,
        handle: str,
        source: SourceStamp | None = None,
        accept: Accept | None = None,
    ) -> AsyncIterator[Claim | None]:
        """Hold ``<key>.lock`` for the body: yield a Claim, or None if the entry got complete.

        While another process holds the lock, wait, and on every look ask
        whether the entry is complete by now (then yield None at once) and
        whether the lock may be taken over (:func:`.locks.verdict`). On the way
        out, whatever happened, this process's download dir and lock go.
        """
        entry = self.entry(key)
        uid = uuid.uuid4().hex
        claim = Claim(entry, uid, locks.lock_contents(uid))
        if not await self._wait_for_lock(claim, handle, source, accept):
            yield None
            return
        try:
            complete = await to_thread.run_sync(self._after_acquire, claim, handle, source, accept)
            yield None if complete else claim
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(self._release, claim)

    async def _wait_for_lock(
        self, claim: Claim, handle: str, source: SourceStamp | None, accept: Accept | None
    ) -> bool:
        started = time.monotonic()
        wait = _POLL[0]
        while True:
            state, why = await to_thread.run_sync(self._poll, claim, handle, source, accept)
            if state == "acquired":
                return True
            if state == "complete":
                return False
            if state == "again":
                continue  # the lock went, or was taken over: try at once
            timeout = self.lock_timeout
            if timeout is not None and time.monotonic() - started >= timeout:
                raise LockTimeoutError(
                    f"{handle}: another process has held {claim.entry.lock} for over "
                    f"{timeout:g}s ({why}); wait longer (lock_timeout=) or, if that process "
                    "is gone, delete the lock file",
                    handle=handle,
                )
            # Jitter, so waiters that started together do not look together.
            await anyio.sleep(wait * random.uniform(0.5, 1.5))
            wait = min(_POLL[1], wait * 2)

    def _poll(
        self, claim: Claim, handle: str, source: SourceStamp | None, accept: Accept | None = None
    ) -> tuple[str, str]:
        """One look: ``("acquired" | "complete" | "again" | "wait", why)``."""
        entry = claim.entry
        with self.guard(handle, "taking the download lock"):
            if locks.try_acquire(entry, claim.contents):
                return "acquired", ""
            if self.lookup(entry.key, source, accept) is not None:
                return "complete", ""
            view = locks.look(entry)
            verdict, why = locks.judge(view, self.stale_after)
            if verdict is locks.Verdict.FREE:
                return "again", why
            if verdict.take_over:
                take_over(entry, view)
                return "again", why
            return "wait", why

    def _after_acquire(
        self, claim: Claim, handle: str, source: SourceStamp | None, accept: Accept | None = None
    ) -> bool:
        """With the lock held: clear leftovers of earlier holders; True if already complete."""
        with self.guard(handle, "clearing old download dirs"):
            # Only the lock's holder writes a download dir, and the lock is ours:
            # any other dir of this key is a leftover of a holder that died.
            for path in claim.entry.tmp_dirs():
                if path != claim.tmp:
                    layout.remove_tree(path)
        return self.lookup(claim.entry.key, source, accept) is not None

    def _release(self, claim: Claim) -> None:
        layout.remove_tree(claim.tmp)
        with contextlib.suppress(OSError):
            locks.release_lock(claim.entry, claim.contents)

    def reap(self, key: str) -> bool:
        """Take over ``<key>.lock`` if its holder is dead (a killed worker); True if done."""
        entry = self.entry(key)
        view = locks.look(entry)
        verdict, _ = locks.judge(view, self.stale_after)
        if verdict is not locks.Verdict.DEAD:
            return False
        return take_over(entry, view)

    # -- download dir and commit -------------------------------------------------

    def fresh_tmp(self, claim: Claim, handle: str) -> Path:
        """An empty download dir for a new attempt."""
        with self.guard(handle, "creating the download dir"):
            layout.remove_tree(claim.tmp)
            claim.tmp.mkdir()
        return claim.tmp

    def commit(
        self,
        claim: Claim,
        handle: str,
        manifest: Manifest,
        *,
        source: SourceStamp | None = None,
        mirror: str | None = None,
    ) -> Path:
        """Make the download dir the entry's module dir, atomically, and record it.

        An incomplete module dir in the way is moved aside first (a rename too),
        so a reader sees the old dir, no dir, or the new one: never a mix. The
        record is written last, so an entry without it is incomplete.
        """
        entry, tmp = claim.entry, claim.tmp
        with self.guard(handle, "committing the module"):
            check_module_root(handle, tmp)
            if locks.read_lock(entry) != claim.contents:
                raise CacheError(
                    f"{handle}: another process took over the download lock {entry.lock} "
                    "while this download stalled (lock_stale_after); nothing was committed, "
                    "try again",
                    handle=handle,
                )
            layout.write_descriptor(entry, handle)
            with contextlib.suppress(FileNotFoundError):
                entry.manifest.unlink()
            junk: Path | None = None
            if entry.module_dir.exists():
                junk = entry.tmp_dir(uuid.uuid4().hex)
                os.rename(entry.module_dir, junk)
            try:
                os.rename(tmp, entry.module_dir)
            finally:
                if junk is not None:
                    layout.remove_tree(junk)
            layout.write_manifest(
                entry,
                handle,
                manifest.files,
                manifest.dirs,
                sha256=manifest.sha256 or None,
                archive_bytes=manifest.archive_bytes,
                source=source,
                tree_sha256=manifest.tree_sha256,
                file_sha256=manifest.file_sha256,
                mirror=mirror,
            )
        self._memo.pop(entry.key, None)
        if self.lookup(entry.key, source) is None:
            raise CacheError(
                f"{handle}: the entry {entry.module_dir} was changed while it was committed",
                handle=handle,
            )
        return entry.module_dir


def _fits(record: Record, source: SourceStamp | None) -> bool:
    return source is None or record.source == source


def take_over(entry: Entry, view: locks.LockView) -> bool:
    """Break a lock judged dead or stalled, and remove its holder's download dir."""
    if view.text is None or not locks.break_lock(entry, view.text):
        return False
    info = view.info
    if info is not None:
        layout.remove_tree(entry.tmp_dir(info.uid))
    return True


def check_module_root(handle: str, tmp: Path) -> None:
    """Refuse an extracted archive whose root is not a SavedModel's root."""
    if layout.has_saved_model(tmp):
        return
    names = sorted(os.listdir(tmp))
    hint = ""
    if len(names) == 1 and (tmp / names[0]).is_dir() and layout.has_saved_model(tmp / names[0]):
        hint = (
            f"; it holds a single directory {names[0]!r} with the module in it, "
            "but the archive's root must be the module root "
            "(pack it with 'tar -czf m.tar.gz -C DIR .')"
        )
    shown = ", ".join(names[:10]) or "nothing"
    raise ArchiveError(
        f"{handle}: the archive holds no saved_model.pb or saved_model.pbtxt at its root "
        f"(found: {shown}){hint}",
        handle=handle,
    )
