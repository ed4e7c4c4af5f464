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
        self,
        key: str,
        source: SourceStamp | None = None,
        accept: Accept | None = None,
        pinned: str | None = None,
    ) -> Path | None:
        """The module dir if the entry is complete (and from ``source``, if given), else None.

        ``accept`` may refuse a complete entry's record (one that lacks a pinned
        digest): that is a miss too. With ``pinned`` (a pin's :attr:`~asynchub.
        _integrity.Pin.name`), the pin's own entry is looked at next (see
        :meth:`commit`). Blocking. A record verified before is re-checked with
        one stat per file.
        """
        hit = self._lookup(key, source, accept)
        if hit is None and pinned is not None:
            hit = self._lookup(layout.pinned_key(key, pinned), source, accept)
        return hit

    def _lookup(self, key: str, source: SourceStamp | None, accept: Accept | None) -> Path | None:
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
        self,
        key: str,
        source: SourceStamp | None = None,
        accept: Accept | None = None,
        pinned: str | None = None,
    ) -> Path | None:
        """A cache hit answered cheaply enough for the event loop, else None (ask lookup).

        Only an entry verified before, with a few files, is checked here: a
        stat per file costs less than the hop to a worker thread.
        """
        hit = self._lookup_inline(key, source, accept)
        if hit is None and pinned is not None:
            hit = self._lookup_inline(layout.pinned_key(key, pinned), source, accept)
        return hit

    def _lookup_inline(
        self, key: str, source: SourceStamp | None, accept: Accept | None
    ) -> Path | None:
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

    def digests(self, key: str, handle: str) -> tuple[str | None, int | None, str | None]:
        """A complete entry's recorded ``(archive sha256, archive bytes, content digest)``.

        As recorded when the bytes streamed in, never computed from the files
        as they are now (they may have been changed since). Blocking;
        CacheError if the entry is not complete.
        """
        entry = self.entry(key)
        with self.guard(handle, "reading the entry's digests"):
            data = layout.read_manifest(entry) or {}
            record = self._memo.get(key)
            if record is None or not layout.still_complete(entry, record):
                raise CacheError(
                    f"{handle}: the entry {entry.module_dir} is not complete", handle=handle
                )
        size = data.get("archive_bytes")
        tree = data.get("tree_sha256")
        return (
            record.sha256,
            size if isinstance(size, int) else None,
            tree if isinstance(tree, str) else None,
        )

    def changed_files(self, key: str, handle: str) -> list[str] | None:
        """Files of an entry whose sha256 is no longer the recorded one; None if none are recorded.

        Reads every byte of the module once. Blocking.
        """
        entry = self.entry(key)
        with self.guard(handle, "hashing the module's files"):
            data = layout.read_manifest(entry) or {}
            sums = data.get("file_sha256")
            if not isinstance(sums, dict):
                return None
            changed = []
            for rel, want in sorted(sums.items()):
                try:
                    have = layout.hash_files(entry, [rel])[rel]
                except FileNotFoundError:
                    have = None
                if have != want:
                    changed.append(rel)
        if changed:
            self._memo.pop(key, None)
        return changed

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
        pinned: str | None = None,
    ) -> AsyncIterator[Claim | Path]:
        """Hold ``<key>.lock`` for the body: yield a Claim, or the module dir if one got complete.

        While another process holds the lock, wait, and on every look ask
        whether the entry (or with ``pinned`` the pin's own entry, as
        :meth:`lookup`) is complete by now, then yield its dir at once, and
        whether the lock may be taken over (:func:`.locks.verdict`). On the way
        out, whatever happened, this process's download dir and lock go. The
        one lock of ``key`` also guards the pin's own entries, so one download
        of a handle runs at a time, whatever its pin.
        """
        entry = self.entry(key)
        uid = uuid.uuid4().hex
        claim = Claim(entry, uid, locks.lock_contents(uid))
        hit = await self._wait_for_lock(claim, handle, source, accept, pinned)
        if hit is not None:
            yield hit
            return
        try:
            hit = await to_thread.run_sync(
                self._after_acquire, claim, handle, source, accept, pinned
            )
            yield claim if hit is None else hit
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(self._release, claim)

    async def _wait_for_lock(
        self,
        claim: Claim,
        handle: str,
        source: SourceStamp | None,
        accept: Accept | None,
        pinned: str | None,
    ) -> Path | None:
        """None once the lock is ours; the module dir if the entry got complete meanwhile."""
        started = time.monotonic()
        wait = _POLL[0]
        while True:
            state, why, hit = await to_thread.run_sync(
                self._poll, claim, handle, source, accept, pinned
            )
            if state == "acquired":
                return None
            if state == "complete":
                return hit
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
        self,
        claim: Claim,
        handle: str,
        source: SourceStamp | None,
        accept: Accept | None = None,
        pinned: str | None = None,
    ) -> tuple[str, str, Path | None]:
        """One look: ``("acquired" | "complete" | "again" | "wait", why, the complete dir)``."""
        entry = claim.entry
        with self.guard(handle, "taking the download lock"):
            if locks.try_acquire(entry, claim.contents):
                return "acquired", "", None
            hit = self.lookup(entry.key, source, accept, pinned)
            if hit is not None:
                return "complete", "", hit
            view = locks.look(entry)
            verdict, why = locks.judge(view, self.stale_after)
            if verdict is locks.Verdict.FREE:
                return "again", why, None
            if verdict.take_over:
                take_over(entry, view)
                return "again", why, None
            return "wait", why, None

    def _after_acquire(
        self,
        claim: Claim,
        handle: str,
        source: SourceStamp | None,
        accept: Accept | None = None,
        pinned: str | None = None,
    ) -> Path | None:
        """With the lock held: clear leftovers of earlier holders; the dir if already complete."""
        with self.guard(handle, "clearing old download dirs"):
            # Only the lock's holder writes a download dir, and the lock is ours:
            # any other dir of this key is a leftover of a holder that died.
            for path in claim.entry.tmp_dirs():
                if path != claim.tmp:
                    layout.remove_tree(path)
        return self.lookup(claim.entry.key, source, accept, pinned)

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

    def check_root(self, claim: Claim, handle: str) -> None:
        """Refuse a download whose root is not a module's (ArchiveError), before any commit."""
        with self.guard(handle, "checking the module's root"):
            check_module_root(handle, claim.tmp)

    def commit(
        self,
        claim: Claim,
        handle: str,
        manifest: Manifest,
        *,
        source: SourceStamp | None = None,
        mirror: str | None = None,
        pinned: str | None = None,
    ) -> Path:
        """Make the download dir a module dir, atomically, and record it; that dir.

        Into the claimed entry, unless ``pinned`` (the digest naming the
        download's pin, or its own) is given and that entry is complete: a
        caller may be reading it, so it is never replaced by other bytes, and
        the download goes into the pin's own entry (:func:`.layout.pinned_key`)
        instead, recorded as ``handle#sha256=<pinned>``. If that one is complete
        already, it is the answer and the download is dropped.

        An incomplete module dir in the way is moved aside first (a rename too),
        so a reader sees the old dir, no dir, or the new one: never a mix. The
        record is written last, so an entry without it is incomplete.
        """
        entry = claim.entry
        with self.guard(handle, "committing the module"):
            check_module_root(handle, claim.tmp)
            if locks.read_lock(entry) != claim.contents:
                raise CacheError(
                    f"{handle}: another process took over the download lock {entry.lock} "
                    "while this download stalled (lock_stale_after); nothing was committed, "
                    "try again",
                    handle=handle,
                )
            if pinned is None or self.lookup(entry.key, source) is None:
                self._install(claim, entry, handle, manifest, source, mirror)
                target = entry
            else:
                target = self.entry(layout.pinned_key(entry.key, pinned))
                hit = self.lookup(target.key, source, _names(pinned))
                if hit is not None:
                    return hit
                with _holding(target, claim.contents, handle, self.stale_after):
                    self._install(
                        claim, target, f"{handle}#sha256={pinned}", manifest, source, mirror
                    )
        self._memo.pop(target.key, None)
        if self.lookup(target.key, source) is None:
            raise CacheError(
                f"{handle}: the entry {target.module_dir} was changed while it was committed",
                handle=handle,
            )
        return target.module_dir

    def _install(
        self,
        claim: Claim,
        entry: Entry,
        handle: str,
        manifest: Manifest,
        source: SourceStamp | None,
        mirror: str | None,
    ) -> None:
        """Rename the claim's download dir into ``entry`` and write its descriptor and record."""
        layout.write_descriptor(entry, handle)
        with contextlib.suppress(FileNotFoundError):
            entry.manifest.unlink()
        junk: Path | None = None
        if entry.module_dir.exists():
            junk = entry.tmp_dir(uuid.uuid4().hex)
            os.rename(entry.module_dir, junk)
        try:
            os.rename(claim.tmp, entry.module_dir)
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


def _fits(record: Record, source: SourceStamp | None) -> bool:
    return source is None or record.source == source


def _names(digest: str) -> Accept:
    """Whether a record holds the module that ``digest`` (either kind) names."""
    return lambda record: digest in (record.sha256, record.tree_sha256)


@contextlib.contextmanager
def _holding(entry: Entry, contents: str, handle: str, stale_after: float) -> Iterator[None]:
    """Hold a pin's own entry's lock while committing into it (``cache rm`` takes it too).

    Downloads into it are already kept apart by the handle's own lock; this
    keeps the cache commands out. A lock left by a dead holder is taken over.
    """
    for _ in range(3):
        if locks.try_acquire(entry, contents):
            break
        view = locks.look(entry)
        verdict, why = locks.judge(view, stale_after)
        if verdict is not locks.Verdict.FREE and not (verdict.take_over and take_over(entry, view)):
            raise CacheError(
                f"{handle}: {entry.lock} is held ({why}), by 'asynchub cache' perhaps; "
                "nothing was committed, try again",
                handle=handle,
            )
    else:
        raise CacheError(f"{handle}: could not take {entry.lock}; try again", handle=handle)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            locks.release_lock(entry, contents)


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
