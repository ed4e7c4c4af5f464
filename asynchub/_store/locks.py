"""The download lock ``<key>.lock``: its file operations, and one verdict on it.

The convention is tensorflow_hub's: the file exists only while one process
downloads ``<key>``, and holds ``"<host>.<pid>.<uid>"``, where ``<key>.<uid>.tmp``
is that process's download dir. Both libraries wait for each other's locks.

Whether a lock may be taken over is decided by :func:`verdict`, a pure function
of what a look at the lock saw (:class:`LockView`) and the clock. The hub and
the ``cache`` commands both ask it, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .layout import Entry

__all__ = [
    "LockInfo",
    "LockView",
    "Verdict",
    "break_lock",
    "holder_is_dead",
    "judge",
    "lock_contents",
    "look",
    "parse_lock",
    "pid_alive",
    "read_lock",
    "release_lock",
    "try_acquire",
    "verdict",
]


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
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        return None
    return LockInfo(host=parts[0], pid=int(parts[1]), uid=parts[2], raw=text)


class Verdict(enum.Enum):
    """What may be done about a lock."""

    FREE = "free"  #: there is no lock: try to take it
    ALIVE = "alive"  #: a live process on this host holds it: wait
    OTHER_HOST = "other host"  #: a process elsewhere holds it and makes progress: wait
    UNREADABLE = "unreadable"  #: it holds no "<host>.<pid>.<uid>" (yet): wait
    DEAD = "dead"  #: its holder on this host is gone: take it over now
    STALLED = "stalled"  #: neither it nor its download dir changed for too long: take over

    @property
    def take_over(self) -> bool:
        return self in (Verdict.DEAD, Verdict.STALLED)


@dataclass(frozen=True)
class LockView:
    """One look at a lock: plain data, so that :func:`verdict` stays pure."""

    text: str | None  #: the lock's text; None when there is no lock file
    mtime: float | None = None  #: the lock file's mtime
    #: the newest mtime of the holder's download dir and everything below it
    tmp_mtime: float | None = None

    @property
    def info(self) -> LockInfo | None:
        return None if self.text is None else parse_lock(self.text)

    @property
    def last_change(self) -> float | None:
        times = [t for t in (self.mtime, self.tmp_mtime) if t is not None]
        return max(times) if times else None


def verdict(
    view: LockView,
    *,
    now: float,
    stale_after: float,
    host: str,
    alive: Callable[[int], bool],
) -> tuple[Verdict, str]:
    """Judge a lock: ``(verdict, why in a phrase)``.

    A holder on this host is judged by its pid: gone means taken over at once.
    Any other lock (another host's, one whose text is unreadable, or a live
    pid's that stopped moving, e.g. a hung process) is taken over once neither
    the lock nor its download dir has changed for ``stale_after`` seconds,
    judged from the files' own timestamps, so a lock found long dead is taken
    over at once, not after waiting that long again. A download that makes
    progress writes into its dir, which moves its newest mtime.
    """
    if view.text is None:
        return Verdict.FREE, "no lock"
    info = view.info
    last = view.last_change
    idle = None if last is None else now - last
    stalled = idle is not None and idle >= stale_after
    if info is not None and info.host == host and not alive(info.pid):
        return Verdict.DEAD, f"holder pid {info.pid} on this host is dead"
    if stalled:
        who = "unreadable lock" if info is None else f"held by {info.host} pid {info.pid}"
        return Verdict.STALLED, f"{who}; nothing changed for {idle:.0f}s"
    if info is None:
        return Verdict.UNREADABLE, "unreadable lock (being written, or left empty)"
    if info.host == host:
        return Verdict.ALIVE, f"held by pid {info.pid}"
    return Verdict.OTHER_HOST, f"held by {info.host} pid {info.pid}"


def judge(view: LockView, stale_after: float) -> tuple[Verdict, str]:
    """:func:`verdict` for a lock seen from this host and process, now."""
    return verdict(
        view, now=time.time(), stale_after=stale_after, host=socket.gethostname(), alive=pid_alive
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return True  # cannot tell: never take over on a guess
    return True


def holder_is_dead(info: LockInfo) -> bool:
    """True when the lock names a process on this host that no longer runs."""
    return info.host == socket.gethostname() and not pid_alive(info.pid)


def read_lock(entry: Entry) -> str | None:
    try:
        return entry.lock.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except OSError:
        return None


def newest_mtime(path: Path) -> float | None:
    """The newest mtime of ``path`` and everything below it; None if it does not exist."""
    newest = _mtime(path)
    if newest is None:
        return None
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            mtime = _mtime(Path(dirpath, name))
            if mtime is not None and mtime > newest:
                newest = mtime
    return newest


def look(entry: Entry) -> LockView:
    """Read the lock and the timestamps :func:`verdict` needs (blocking)."""
    mtime = _mtime(entry.lock)
    text = read_lock(entry)
    if text is None:
        return LockView(None)
    info = parse_lock(text)
    tmp_mtime = newest_mtime(entry.tmp_dir(info.uid)) if info is not None else None
    return LockView(text, mtime, tmp_mtime)


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
        # On NFS a link() whose reply was lost is sent again, and the server then
        # answers "exists" for the link it made the first time: the lock is ours
        # if our private file now has two names (open(2) gives the same advice).
        return _linked(tmp)
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
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _linked(tmp: Path) -> bool:
    try:
        return os.stat(tmp).st_nlink == 2
    except OSError:
        return False


def release_lock(entry: Entry, contents: str) -> None:
    """Remove the lock if it is still ours (a stale-lock takeover may have replaced it)."""
    if read_lock(entry) == contents:
        with contextlib.suppress(FileNotFoundError):
            entry.lock.unlink()


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
        if aside.read_text(encoding="utf-8", errors="replace") == expected:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, entry.lock)
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
