"""The on-disk layout of a cache entry, and its completeness record.

The layout, key and descriptor are tensorflow_hub's, so both libraries share
one cache::

    <cache>/<key>/                  the module, exactly the archive's root
    <cache>/<key>.descriptor.txt    who fetched it, when (asynchub adds a line naming itself)
    <cache>/<key>.lock              only while one process downloads <key> (see locks.py)
    <cache>/<key>.<uid>.tmp/        a download in progress
    <cache>/<key>.manifest.json     asynchub's completeness record

A pinned download that finds ``<key>/`` complete with other bytes does not
replace it (a caller may be reading it): it goes into the pin's own entry,
an entry like any other under the key :func:`pinned_key` gives, whose record
names the handle with its ``#sha256=`` fragment.

All functions here block and raise OSError; :mod:`.store` turns that into
CacheError.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FORMAT",
    "Entry",
    "Record",
    "SourceStamp",
    "has_saved_model",
    "hash_files",
    "pinned_key",
    "read_manifest",
    "remove_tree",
    "still_complete",
    "tree_size",
    "verify",
    "written_by_asynchub",
]

MANIFEST_FORMAT = "asynchub-manifest/1"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: The descriptor line that says asynchub wrote the entry, so it must have a record.
DESCRIPTOR_MARK = "Completeness record: "
#: (size, mtime_ns) of a local archive when it was extracted.
SourceStamp = tuple[int, int]
_TMP_DIR = re.compile(r"^(?P<key>[0-9a-f]{40})\.(?P<uid>[0-9a-f]{32})\.tmp$")
_SHARD = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")


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

    def tmp_dirs(self) -> list[Path]:
        """Every download dir of this key (ours, another process's, or a leftover)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [
            self.root / name
            for name in names
            if (m := _TMP_DIR.match(name)) is not None and m["key"] == self.key
        ]


def pinned_key(key: str, digest: str) -> str:
    """The key of the entry that holds the module pinned by ``digest`` (hex) for ``key``.

    A 40-hex key like tensorflow_hub's, so every tool that walks the cache
    (``asynchub cache``, tensorflow_hub's lock and tmp conventions) sees an
    ordinary entry; derived from the key, not the handle's spelling.
    """
    return hashlib.sha1(f"{key}#sha256={digest}".encode()).hexdigest()


def tmp_dir_uid(name: str) -> tuple[str, str] | None:
    """``(key, uid)`` of a download dir's name, else None."""
    m = _TMP_DIR.match(name)
    return None if m is None else (m["key"], m["uid"])


# -- completeness -------------------------------------------------------------


def has_saved_model(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_MODEL_FILES)


def variables_whole(path: Path) -> bool:
    """Whether a SavedModel's ``variables/`` holds its index and every data shard it names.

    The check for entries without a record: a cleaner that deleted one shard
    leaves ``variables.data-00000-of-00002`` without its sibling.
    """
    variables = path / "variables"
    if not variables.is_dir():
        return True  # a module without variables (or a TF1 hub module)
    try:
        names = os.listdir(variables)
    except OSError:
        return False
    shards = [m for name in names if (m := _SHARD.match(name)) is not None]
    if not (variables / "variables.index").is_file():
        return False
    if not shards:
        return False
    counts = {int(m.group(2)) for m in shards}
    if len(counts) != 1:
        return False
    (count,) = counts
    return {int(m.group(1)) for m in shards} == set(range(count))


def read_manifest(entry: Entry) -> dict[str, Any] | None:
    """The completeness record, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(entry.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def written_by_asynchub(entry: Entry) -> bool:
    """Whether the descriptor says asynchub wrote the entry (so it must have a record)."""
    try:
        text = entry.descriptor.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return DESCRIPTOR_MARK in text


@dataclass(frozen=True)
class Record:
    """A verified completeness record, with the identity of the manifest it came from."""

    files: tuple[tuple[str, int], ...]
    dirs: tuple[str, ...]
    #: (inode, mtime_ns, size) of the manifest; None for an entry without one.
    stamp: tuple[int, int, int] | None
    sha256: str | None = None  #: of the archive the entry was extracted from
    source: SourceStamp | None = None  #: of the local archive it was extracted from
    #: the module's content digest (see _integrity), when its files were hashed
    tree_sha256: str | None = None
    #: the mirror the archive came from (its sha256 is then the mirror's re-pack's)
    mirror: str | None = None

    @property
    def checks(self) -> int:
        return len(self.files) + len(self.dirs)


def _stamp(entry: Entry) -> tuple[int, int, int] | None:
    try:
        st = os.stat(f"{os.fspath(entry.root)}{os.sep}{entry.key}.manifest.json")
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def verify(entry: Entry) -> Record | None:
    """The entry's record if it holds a whole module, else None.

    With a completeness record, every file it lists must exist with its size.
    An entry asynchub wrote without a record is incomplete (the record is
    written last; its loss means a crash or a cleaner). An entry tensorflow_hub
    wrote needs a ``saved_model.pb``/``.pbtxt`` and whole variables.
    """
    if not entry.module_dir.is_dir():
        return None
    stamp = _stamp(entry)
    data = read_manifest(entry) if stamp is not None else None
    if data is None:
        if written_by_asynchub(entry):
            return None
        whole = has_saved_model(entry.module_dir) and variables_whole(entry.module_dir)
        return Record((), (), None) if whole else None
    files = data.get("files")
    if not isinstance(files, dict):
        return None
    source = data.get("source")
    try:
        record = Record(
            files=tuple((str(k), int(v)) for k, v in files.items()),
            dirs=tuple(str(d) for d in data.get("dirs", ())),
            stamp=stamp,
            sha256=data.get("sha256"),
            source=None if source is None else (int(source[0]), int(source[1])),
            tree_sha256=data.get("tree_sha256"),
            mirror=data.get("mirror"),
        )
    except (TypeError, ValueError, IndexError):
        return None
    return record if still_complete(entry, record) else None


def still_complete(entry: Entry, record: Record) -> bool:
    """Whether ``entry`` still matches ``record``: one stat per file, no reads.

    On every cache hit, so paths are joined as strings: building a Path per
    file cost more than its stat (half of a hit's ~50 µs).
    """
    if record.stamp is None:
        return _stamp(entry) is None and has_saved_model(entry.module_dir)
    if _stamp(entry) != record.stamp:
        return False
    base = f"{os.fspath(entry.root)}{os.sep}{entry.key}{os.sep}"
    stat = os.stat
    for rel, size in record.files:
        try:
            if stat(base + rel).st_size != size:
                return False
        except OSError:
            return False
    return all(os.path.isdir(base + rel) for rel in record.dirs)


def write_manifest(
    entry: Entry,
    handle: str,
    files: dict[str, int],
    dirs: set[str],
    *,
    sha256: str | None,
    archive_bytes: int | None,
    source: SourceStamp | None,
    tree_sha256: str | None = None,
    file_sha256: dict[str, str] | None = None,
    mirror: str | None = None,
) -> None:
    record: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "handle": handle,
        "bytes": sum(files.values()),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256,
        "archive_bytes": archive_bytes,
        "source": None if source is None else list(source),
        "files": dict(sorted(files.items())),
        "dirs": sorted(dirs),
    }
    if tree_sha256 is not None:
        record["tree_sha256"] = tree_sha256
    if file_sha256 is not None:
        record["file_sha256"] = dict(sorted(file_sha256.items()))
    if mirror is not None:
        record["mirror"] = mirror
    atomic_write(entry.manifest, json.dumps(record, indent=1))


def write_descriptor(entry: Entry, handle: str) -> None:
    # tensorflow_hub's three lines (it writes the file and never reads it), plus
    # one that marks the entry as asynchub's: such an entry without its record
    # is incomplete.
    text = (
        f"Module: {handle}\nDownload Time: {datetime.datetime.today()}\n"
        f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})\n"
        f"{DESCRIPTOR_MARK}{entry.manifest.name} (asynchub)"
    )
    atomic_write(entry.descriptor, text)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def hash_files(entry: Entry, files: list[str]) -> dict[str, str]:
    """The sha256 of each of the module's ``files`` (paths relative to its dir)."""
    sums = {}
    for rel in files:
        digest = hashlib.sha256()
        with open(entry.module_dir / rel, "rb") as fh:
            while block := fh.read(1024 * 1024):
                digest.update(block)
        sums[rel] = digest.hexdigest()
    return sums


def tree_size(path: Path) -> int:
    """Bytes below ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
