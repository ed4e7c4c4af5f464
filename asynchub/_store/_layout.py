"""The on-disk cache: layout, completeness records, locks, and the atomic commit.

The layout, key, descriptor and lock convention are tensorflow_hub's, so both
libraries share one cache and wait for each other's downloads::

    <cache>/<key>/                  the module, exactly the archive's root
    <cache>/<key>.descriptor.txt    who fetched it, when
    <cache>/<key>.lock              only while one process downloads <key>: "<host>.<pid>.<uid>"
    <cache>/<key>.<uid>.tmp/        a download in progress
    <cache>/<key>.manifest.json     asynchub's completeness record (each file's size)

All functions here block; the async core calls them through worker threads.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._archive import Manifest
from .errors import CacheError

__all__ = [
    "MANIFEST_FORMAT",
    "Entry",
    "LockInfo",
    "Record",
    "break_lock",
    "commit",
    "holder_is_dead",
    "is_complete",
    "lock_contents",
    "parse_lock",
    "read_lock",
    "read_manifest",
    "release_lock",
    "remove_tree",
    "still_complete",
    "tree_size",
    "try_acquire",
    "verify",
]

MANIFEST_FORMAT = "asynchub-manifest/1"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


@dataclass(frozen=True)
class Entry:
    """The paths belonging to one cache key."""

    root: Path
    key: str

    @property
    def module_dir(self) -> Path:
        return self.root / self.key

    @property
    def descriptor(self) -> Path:
        return self.root / f"{self.key}.descriptor.txt"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.key}.lock"

    @property
    def manifest(self) -> Path:
        return self.root / f"{self.key}.manifest.json"

    def tmp_dir(self, uid: str) -> Path:
        return self.root / f"{self.key}.{uid}.tmp"


def ensure_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(
            f"cannot create the cache dir {root}: {exc.strerror}; "
            "pass cache_dir= or set TFHUB_CACHE_DIR to a writable directory"
        ) from exc


# -- completeness -------------------------------------------------------------


def has_saved_model(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_MODEL_FILES)


def read_manifest(entry: Entry) -> dict[str, Any] | None:
    """The completeness record, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(entry.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


@dataclass(frozen=True)
class Record:
    """A verified completeness record, with the identity of the manifest it came from."""

    files: tuple[tuple[str, int], ...]
    dirs: tuple[str, ...]
    #: (inode, mtime_ns, size) of the manifest; None for an entry without one.
    stamp: tuple[int, int, int] | None

    @property
    def checks(self) -> int:
        return len(self.files) + len(self.dirs)


def _stamp(entry: Entry) -> tuple[int, int, int] | None:
    try:
        st = os.stat(entry.manifest)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def verify(entry: Entry) -> Record | None:
    """The entry's record if it holds a whole module, else None.

    With a completeness record, every file it lists must exist with its size;
    without one (an entry tensorflow_hub wrote), a ``saved_model.pb``/``.pbtxt``
    at the root is enough.
    """
    if not entry.module_dir.is_dir():
        return None
    stamp = _stamp(entry)
    data = read_manifest(entry) if stamp is not None else None
    if data is None:
        return Record((), (), None) if has_saved_model(entry.module_dir) else None
    files = data.get("files")
    if not isinstance(files, dict):
        return None
    record = Record(
        files=tuple((str(k), int(v)) for k, v in files.items()),
        dirs=tuple(str(d) for d in data.get("dirs", ())),
        stamp=stamp,
    )
    return record if still_complete(entry, record) else None


def still_complete(entry: Entry, record: Record) -> bool:
    """Whether ``entry`` still matches ``record``: one stat per file, no reads."""
    module_dir = entry.module_dir
    if record.stamp is None:
        return _stamp(entry) is None and has_saved_model(module_dir)
    if _stamp(entry) != record.stamp:
        return False
    for rel, size in record.files:
        try:
            if os.stat(module_dir / rel).st_size != size:
                return False
        except OSError:
            return False
    return all((module_dir / rel).is_dir() for rel in record.dirs)


def is_complete(entry: Entry) -> bool:
    """Whether ``entry`` holds a whole module (see :func:`verify`)."""
    return verify(entry) is not None


def write_manifest(entry: Entry, handle: str, manifest: Manifest) -> None:
    record = {
        "format": MANIFEST_FORMAT,
        "handle": handle,
        "bytes": manifest.total_bytes,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": dict(sorted(manifest.files.items())),
        "dirs": sorted(manifest.dirs),
    }
    _atomic_write(entry.manifest, json.dumps(record, indent=1))


def write_descriptor(entry: Entry, handle: str) -> None:
    # The same three lines tensorflow_hub writes, so either library's entries read alike.
    text = (
        f"Module: {handle}\nDownload Time: {datetime.datetime.today()}\n"
        f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})"
    )
    _atomic_write(entry.descriptor, text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# -- locks --------------------------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    uid: str
    raw: str


def lock_contents(uid: str) -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uid}"


def parse_lock(text: str) -> LockInfo | None:
    """Split ``"<host>.<pid>.<uid>"``; host names may hold dots, so split from the right."""
    parts = text.strip().rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return LockInfo(host=parts[0], pid=int(parts[1]), uid=parts[2], raw=text)


def read_lock(entry: Entry) -> str | None:
    try:
        return entry.lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def try_acquire(entry: Entry, contents: str) -> bool:
    """Create the lock file holding ``contents`` if there is none; True if this call made it.

    The text is written to a private file first and then hard-linked into
    place, so no reader ever sees an empty lock, and link() fails atomically
    when the lock exists.
    """
    tmp = entry.root / f"{entry.key}.lock.{uuid.uuid4().hex}.tmp"
    tmp.write_text(contents, encoding="utf-8")
    try:
        os.link(tmp, entry.lock)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # File systems without hard links: exclusive create, then write.
        try:
            fd = os.open(entry.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(contents)
        return True
    finally:
        tmp.unlink()


def release_lock(entry: Entry, contents: str) -> None:
    """Remove the lock if it is still ours (a stale-lock takeover may have replaced it)."""
    if read_lock(entry) == contents:
        with contextlib.suppress(FileNotFoundError):
            entry.lock.unlink()


def holder_is_dead(info: LockInfo) -> bool:
    """True when the lock names a process on this host that no longer runs."""
    if info.host != socket.gethostname():
        return False
    if info.pid == os.getpid():
        return False  # another task of ours; never ours to break
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False


def break_lock(entry: Entry, expected: str) -> bool:
    """Remove a stale lock whose text is ``expected``; leave any other lock alone.

    The lock is first renamed aside, which only one process can do, then its
    text is checked: if a live holder replaced the stale lock meanwhile, its
    lock is put back.
    """
    aside = entry.root / f"{entry.key}.lock.{uuid.uuid4().hex}.stale"
    try:
        os.rename(entry.lock, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text(encoding="utf-8") == expected:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, entry.lock)
        return False
    finally:
        aside.unlink()


def tree_size(path: Path) -> int:
    """Bytes below ``path`` (0 when it does not exist): how far a download has come."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# -- commit and clean-up ------------------------------------------------------


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def commit(entry: Entry, tmp: Path, handle: str, manifest: Manifest) -> Path:
    """Make the extracted ``tmp`` dir the entry's module dir, atomically.

    Called with the lock held. An incomplete module dir in the way is moved
    aside first (a rename too), so a reader sees the old dir, no dir, or the
    new one: never a mix.
    """
    write_descriptor(entry, handle)
    with contextlib.suppress(FileNotFoundError):
        entry.manifest.unlink()
    junk: Path | None = None
    if entry.module_dir.exists():
        junk = entry.tmp_dir(uuid.uuid4().hex)
        os.rename(entry.module_dir, junk)
    try:
        os.rename(tmp, entry.module_dir)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not is_complete(entry):
            raise
        # Someone that ignores our lock finished first; theirs is as good as ours.
        remove_tree(tmp)
        return entry.module_dir
    finally:
        if junk is not None:
            remove_tree(junk)
    write_manifest(entry, handle, manifest)
    return entry.module_dir
