"""Inspect and tidy a cache dir: list, remove, prune, verify.

Blocking functions over the layout described in ``layout.py``
(tensorflow_hub's, plus asynchub's manifest). Completeness is the store's
``lookup`` and lock staleness is ``locks.verdict``: the same answers the hub
gets. They take the same ``<key>.lock`` a download takes before removing an
entry, and never touch a key whose lock is held by a live process, so they are
safe to run while other processes use the cache. Each returns plain data for
the CLI to print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._handles import key_of
from .._integrity import split_fragment
from ..errors import CacheError, HubError
from . import layout as cache
from . import locks
from .store import Store

__all__ = [
    "CacheEntryInfo",
    "EntryCheck",
    "Removal",
    "list_entries",
    "prune",
    "remove",
    "verify",
]

_KEY = re.compile(r"^[0-9a-f]{40}$")
#: ``<key>``, ``<key>.descriptor.txt``, ``<key>.manifest.json``, ``<key>.lock``, or a
#: leftover: ``<key>.<uid>.tmp`` (a download dir) and the transient ``….tmp``/``….stale``
#: files of atomic writes and lock breaking.
_NAME = re.compile(r"^(?P<key>[0-9a-f]{40})(?:\.(?P<rest>.+))?$")
#: Leftover *files* younger than this are left alone: they may belong to a
#: write or lock take-over happening right now.
TRANSIENT_GRACE = 60.0
#: A lock that, with its download dir, has not changed for this long is stale
#: (the hub's own default for ``lock_stale_after``).
OTHER_HOST_STALE_AFTER = 600.0


@dataclass(frozen=True)
class CacheEntryInfo:
    """One cache entry as ``cache ls`` shows it."""

    key: str
    handle: str | None  #: from the manifest, else the descriptor's ``Module:`` line
    path: Path  #: the module dir (it may not exist for an orphaned record)
    size: int  #: bytes of the files below the module dir
    fetched: datetime.datetime | None  #: when it was written (UTC), if known
    complete: bool  #: per ``_cache.is_complete``
    has_manifest: bool  #: asynchub's completeness record is there (else: tensorflow_hub wrote it)
    locked: bool  #: a live process holds ``<key>.lock`` (a download in progress)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "handle": self.handle,
            "path": str(self.path),
            "bytes": self.size,
            "fetched": self.fetched.isoformat() if self.fetched else None,
            "complete": self.complete,
            "has_manifest": self.has_manifest,
            "locked": self.locked,
        }


@dataclass(frozen=True)
class Removal:
    """One path removed (or, in a dry run, that would be), and why."""

    path: Path
    kind: str  #: "module", "descriptor", "manifest", "tmp" or "lock"
    key: str
    size: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "key": self.key,
            "bytes": self.size,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class EntryCheck:
    """One entry checked against its manifest by ``verify``."""

    key: str
    handle: str | None
    complete: bool
    has_manifest: bool
    missing: list[str] = field(default_factory=list)  #: files (and dirs, ending "/") not there
    wrong_size: list[tuple[str, int, int]] = field(default_factory=list)  #: (path, want, have)
    problem: str | None = None  #: why it is incomplete, in a phrase
    #: with ``digests``: files whose sha256 is not the recorded one
    wrong_digest: list[str] = field(default_factory=list)
    #: with ``digests``: True if every file was re-hashed, None if none were recorded
    digests_checked: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "handle": self.handle,
            "complete": self.complete,
            "has_manifest": self.has_manifest,
            "missing": self.missing,
            "wrong_size": [
                {"path": p, "expected": want, "actual": have} for p, want, have in self.wrong_size
            ],
            "problem": self.problem,
            "wrong_digest": self.wrong_digest,
            "digests_checked": self.digests_checked,
        }


# -- listing -------------------------------------------------------------------


def list_entries(cache_dir: Path) -> list[CacheEntryInfo]:
    """Every entry in ``cache_dir`` (a module dir, or a record left without one), by handle."""
    infos = []
    for key in _keys(cache_dir):
        entry = cache.Entry(cache_dir, key)
        infos.append(
            CacheEntryInfo(
                key=key,
                handle=_handle_of(entry),
                path=entry.module_dir,
                size=cache.tree_size(entry.module_dir),
                fetched=_fetched(entry),
                complete=_complete(entry),
                has_manifest=cache.read_manifest(entry) is not None,
                locked=_lock_state(entry)[0] == "live",
            )
        )
    return sorted(infos, key=lambda i: (i.handle or "", i.key))


def _keys(cache_dir: Path) -> list[str]:
    """Keys that have a module dir, a descriptor or a manifest."""
    keys: set[str] = set()
    for name in _names(cache_dir):
        match = _NAME.match(name)
        if match and match["rest"] in (None, "descriptor.txt", "manifest.json"):
            keys.add(match["key"])
    return sorted(keys)


def _names(cache_dir: Path) -> list[str]:
    try:
        return os.listdir(cache_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CacheError(f"cannot read the cache dir {cache_dir}: {exc.strerror}") from exc


def _descriptor(entry: cache.Entry) -> dict[str, str]:
    try:
        text = entry.descriptor.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def _handle_of(entry: cache.Entry) -> str | None:
    record = cache.read_manifest(entry)
    if record is not None and isinstance(record.get("handle"), str):
        return str(record["handle"])
    return _descriptor(entry).get("Module")


def _fetched(entry: cache.Entry) -> datetime.datetime | None:
    """When the entry was written: the manifest's time, the descriptor's, or the dir's mtime."""
    utc = datetime.timezone.utc
    record = cache.read_manifest(entry)
    if record is not None and isinstance(record.get("written"), str):
        with contextlib.suppress(ValueError):
            return datetime.datetime.fromisoformat(record["written"]).astimezone(utc)
    text = _descriptor(entry).get("Download Time")
    if text:
        with contextlib.suppress(ValueError):
            # tensorflow_hub writes local time without a zone: astimezone() assumes local.
            return datetime.datetime.fromisoformat(text).astimezone(utc)
    for path in (entry.module_dir, entry.descriptor, entry.manifest):
        with contextlib.suppress(OSError):
            return datetime.datetime.fromtimestamp(path.stat().st_mtime, tz=utc)
    return None


# -- locks -----------------------------------------------------------------------


def _lock_state(entry: cache.Entry, now: float | None = None) -> tuple[str, str]:
    """``("none" | "live" | "stale", why)`` for ``<key>.lock``, by the hub's own verdict."""
    view = locks.look(entry)
    if now is None:
        verdict, why = locks.judge(view, OTHER_HOST_STALE_AFTER)
    else:
        verdict, why = locks.verdict(
            view,
            now=now,
            stale_after=OTHER_HOST_STALE_AFTER,
            host=socket.gethostname(),
            alive=locks.pid_alive,
        )
    if verdict is locks.Verdict.FREE:
        return "none", ""
    return ("stale" if verdict.take_over else "live"), why


def _complete(entry: cache.Entry) -> bool:
    return Store(entry.root).lookup(entry.key) is not None


def _age(path: Path, now: float) -> float | None:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return None


def _age_of_tree(path: Path, now: float) -> float | None:
    """Seconds since anything below ``path`` last changed."""
    newest: float | None = None
    for dirpath, _dirs, files in os.walk(path):
        for name in (dirpath, *(os.path.join(dirpath, f) for f in files)):
            with contextlib.suppress(OSError):
                mtime = os.lstat(name).st_mtime
                newest = mtime if newest is None else max(newest, mtime)
    return None if newest is None else now - newest


@contextlib.contextmanager
def _holding(entry: cache.Entry) -> Iterator[None]:
    """Hold ``<key>.lock`` as a download would, so nobody starts one while we remove.

    A lock left by a dead process is broken first; a live one is refused.
    """
    contents = locks.lock_contents(f"rm{uuid.uuid4().hex}")
    while not locks.try_acquire(entry, contents):
        state, why = _lock_state(entry)
        text = locks.read_lock(entry)
        if state == "stale" and text is not None:
            locks.break_lock(entry, text)
            continue
        if state == "none":
            continue  # released between the two looks: try again
        raise CacheError(
            f"{entry.key} is being downloaded ({why}; lock {entry.lock}); "
            "try again when that download has finished",
            handle=entry.key,
        )
    try:
        yield
    finally:
        locks.release_lock(entry, contents)


# -- removing ----------------------------------------------------------------------


def remove(cache_dir: Path, handle_or_key: str, dry_run: bool = False) -> list[Removal]:
    """Remove one entry (module dir, descriptor, manifest) named by its handle or key.

    Leftover download dirs of the key go too. Raises CacheError when there is
    no such entry or a live process holds its lock. With ``dry_run`` nothing
    is removed; the result says what would be.
    """
    key = _find_key(cache_dir, handle_or_key)
    entry = cache.Entry(cache_dir, key)
    state, why = _lock_state(entry)
    if state == "live":
        raise CacheError(
            f"{handle_or_key} is being downloaded ({why}; lock {entry.lock}); "
            "try again when that download has finished",
            handle=handle_or_key,
        )
    planned = _entry_parts(entry, f"removed by request ({handle_or_key})")
    planned += [
        Removal(p, "tmp", key, cache.tree_size(p), "leftover download dir")
        for p in _tmp_dirs(cache_dir, key)
    ]
    if state == "stale":
        planned.append(Removal(entry.lock, "lock", key, _size(entry.lock), f"stale lock: {why}"))
    if dry_run:
        return planned
    with _holding(entry):
        _delete_entry(entry)
        for item in planned:
            if item.kind == "tmp":
                cache.remove_tree(item.path)
    return planned


def _find_key(cache_dir: Path, handle_or_key: str) -> str:
    keys = set(_keys(cache_dir))
    if _KEY.match(handle_or_key) and handle_or_key in keys:
        return handle_or_key
    pinned = _pinned_key(cache_dir, handle_or_key, keys)
    if pinned is not None:
        return pinned
    key = key_of(handle_or_key)
    if key in keys and "#sha256=" not in handle_or_key:
        return key
    # Handles are stored as given; a path may have been given in another spelling.
    for candidate in keys:
        if _handle_of(cache.Entry(cache_dir, candidate)) == handle_or_key:
            return candidate
    raise CacheError(
        f"no cache entry for {handle_or_key!r} in {cache_dir}; "
        "'asynchub cache ls' lists the handles and keys there",
        handle=handle_or_key,
    )


def _pinned_key(cache_dir: Path, text: str, keys: set[str]) -> str | None:
    """The entry holding the module ``HANDLE#sha256=DIGEST`` names, of the handle's two.

    The handle's own entry if its record holds that digest, else the pin's own
    entry (``layout.pinned_key``). Never the handle's entry holding other
    bytes: removing it is not what was asked.
    """
    try:
        base, digest = split_fragment(text)
    except HubError:
        return None
    if digest is None:
        return None
    key = key_of(base)
    for candidate in (key, cache.pinned_key(key, digest)):
        record = cache.read_manifest(cache.Entry(cache_dir, candidate)) or {}
        if candidate in keys and digest in (record.get("sha256"), record.get("tree_sha256")):
            return candidate
    return None


def _entry_parts(entry: cache.Entry, reason: str) -> list[Removal]:
    parts = []
    if entry.module_dir.exists():
        size = cache.tree_size(entry.module_dir)
        parts.append(Removal(entry.module_dir, "module", entry.key, size, reason))
    for path, kind in ((entry.descriptor, "descriptor"), (entry.manifest, "manifest")):
        if path.exists():
            parts.append(Removal(path, kind, entry.key, _size(path), reason))
    return parts


def _delete_entry(entry: cache.Entry) -> None:
    """Remove an entry so that no reader ever sees part of a module dir.

    The module dir is renamed aside first (atomic), so it is whole or gone;
    only then do its records go, and last the renamed tree.
    """
    aside: Path | None = None
    if entry.module_dir.exists():
        aside = entry.tmp_dir(f"rm{uuid.uuid4().hex}")
        os.rename(entry.module_dir, aside)
    for path in (entry.manifest, entry.descriptor):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if aside is not None:
        cache.remove_tree(aside)


def _tmp_dirs(cache_dir: Path, key: str) -> list[Path]:
    return sorted(
        cache_dir / name
        for name in _names(cache_dir)
        if name.startswith(f"{key}.") and name.endswith(".tmp") and (cache_dir / name).is_dir()
    )


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def prune(
    cache_dir: Path,
    older_than: datetime.timedelta | None = None,
    incomplete: bool = False,
    dry_run: bool = False,
) -> list[Removal]:
    """Tidy ``cache_dir``; return what was (or with ``dry_run`` would be) removed.

    Always removes leftovers: ``<key>.<uid>.tmp`` download dirs and temporary
    files of keys no live process is downloading, and stale locks (holder
    dead, or from another host with its download dir gone). Also removes
    entries fetched longer than ``older_than`` ago, and with ``incomplete``
    entries that fail the completeness check. A key with a live lock is never
    touched.
    """
    now = time.time()
    names = _names(cache_dir)  # listed before the locks are read: see _prune_leftovers
    removals: list[Removal] = []
    states: dict[str, tuple[str, str]] = {}

    def state_of(key: str) -> tuple[str, str]:
        if key not in states:
            states[key] = _lock_state(cache.Entry(cache_dir, key), now)
        return states[key]

    # Leftovers first: a stale lock broken here is reported as such, and the
    # entries below can then take their locks at once.
    removals += _prune_leftovers(cache_dir, names, state_of, now, dry_run)
    cutoff = None
    if older_than is not None:
        cutoff = datetime.datetime.now(datetime.timezone.utc) - older_than
    for key in _keys(cache_dir):
        entry = cache.Entry(cache_dir, key)
        if state_of(key)[0] == "live":
            continue  # mid-download an entry looks incomplete: not ours to judge
        reason = None
        if incomplete and not _complete(entry):
            reason = "incomplete"
        elif cutoff is not None:
            fetched = _fetched(entry)
            if fetched is not None and fetched < cutoff:
                reason = f"fetched {fetched:%Y-%m-%d %H:%M} UTC, older than {_span(older_than)}"
        if reason is None:
            continue
        parts = _entry_parts(entry, reason)
        if not dry_run:
            try:
                with _holding(entry):
                    _delete_entry(entry)
            except CacheError:
                continue  # a download started meanwhile: leave it be
        removals += parts

    return removals


def _prune_leftovers(
    cache_dir: Path,
    names: list[str],
    state_of: Callable[[str], tuple[str, str]],
    now: float,
    dry_run: bool,
) -> list[Removal]:
    """Leftover tmp dirs and files, then stale locks.

    ``names`` was listed before any lock was read, so a download dir that a
    process creates after it takes its lock is never in it; one listed while a
    live lock was held is skipped because the lock is seen.
    """
    removals: list[Removal] = []
    for name in sorted(names):
        match = _NAME.match(name)
        rest = match["rest"] if match else None
        if match is None or rest is None or not rest.endswith((".tmp", ".stale")):
            continue
        key = match["key"]
        if state_of(key)[0] == "live":
            continue
        path = cache_dir / name
        if path.is_dir():
            item = Removal(path, "tmp", key, cache.tree_size(path), "leftover download dir")
        else:
            age = _age(path, now)
            if age is None or age < TRANSIENT_GRACE:
                continue
            item = Removal(path, "tmp", key, _size(path), "leftover temporary file")
        if not dry_run:
            if path.is_dir():
                cache.remove_tree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        removals.append(item)
    for name in sorted(names):
        match = _NAME.match(name)
        if match is None or match["rest"] != "lock":
            continue
        entry = cache.Entry(cache_dir, match["key"])
        state, why = state_of(entry.key)
        text = locks.read_lock(entry)
        if state != "stale" or text is None:
            continue
        item = Removal(entry.lock, "lock", entry.key, len(text), f"stale lock: {why}")
        # break_lock removes it only if it still holds the text judged stale.
        if dry_run or locks.break_lock(entry, text):
            removals.append(item)
    return removals


def _span(delta: datetime.timedelta | None) -> str:
    """``90d``, ``12h``, ``90m`` or ``45s``: the largest unit that divides it."""
    seconds = int(delta.total_seconds()) if delta is not None else 0
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- verify ------------------------------------------------------------------------


def verify(cache_dir: Path, digests: bool = False) -> list[EntryCheck]:
    """Check every entry against its manifest: which are complete, and what is missing.

    An entry without a manifest (tensorflow_hub wrote it) can only be checked
    for a ``saved_model.pb``/``.pbtxt`` at its root. With ``digests``, every
    file of a complete entry whose record holds per-file sha256 (extracted
    with ``file_digests=True``, or copied from an ``s3://``/``gs://`` prefix)
    is read and hashed again: a file changed in place, same size, is found.
    The archive's own sha256 cannot be checked this way (the archive is not
    kept), so entries without per-file digests say so and pass.
    """
    checks = []
    for key in _keys(cache_dir):
        entry = cache.Entry(cache_dir, key)
        check = _check(entry)
        if digests and check.complete:
            check = _check_digests(entry, check)
        checks.append(check)
    return sorted(checks, key=lambda c: (c.handle or "", c.key))


def _check_digests(entry: cache.Entry, check: EntryCheck) -> EntryCheck:
    record = cache.read_manifest(entry) or {}
    sums = record.get("file_sha256")
    if not isinstance(sums, dict):
        return dataclasses.replace(check, digests_checked=None)
    wrong = []
    for rel, want in sorted(sums.items()):
        try:
            have = cache.hash_files(entry, [rel])[rel]
        except OSError:
            wrong.append(rel)
            continue
        if have != want:
            wrong.append(rel)
    if not wrong:
        return dataclasses.replace(check, digests_checked=True)
    return dataclasses.replace(
        check,
        complete=False,
        digests_checked=True,
        wrong_digest=wrong,
        problem=f"{len(wrong)} file(s) no longer have their recorded sha256",
    )


def _check(entry: cache.Entry) -> EntryCheck:
    handle = _handle_of(entry)
    record = cache.read_manifest(entry)
    has_manifest = record is not None
    complete = _complete(entry)
    if not entry.module_dir.is_dir():
        return EntryCheck(entry.key, handle, complete, has_manifest, problem="no module dir")
    if record is None:
        if complete:
            problem = None
        elif cache.written_by_asynchub(entry):
            problem = "written by asynchub, but its completeness record is gone"
        else:
            problem = "no manifest, and no saved_model.pb or whole variables"
        return EntryCheck(entry.key, handle, complete, has_manifest, problem=problem)
    missing: list[str] = []
    wrong: list[tuple[str, int, int]] = []
    files = record.get("files")
    if not isinstance(files, dict):
        return EntryCheck(entry.key, handle, complete, True, problem="unreadable manifest")
    for rel, want in sorted(files.items()):
        try:
            have = os.stat(entry.module_dir / rel).st_size
        except OSError:
            missing.append(rel)
            continue
        if have != want:
            wrong.append((rel, want, have))
    missing += [f"{d}/" for d in record.get("dirs", ()) if not (entry.module_dir / d).is_dir()]
    problem = None
    if missing or wrong:
        problem = f"{len(missing)} missing, {len(wrong)} of the wrong size"
    return EntryCheck(entry.key, handle, complete, True, missing, wrong, problem)
