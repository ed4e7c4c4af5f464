"""Modules on disk: a ROOT of ``NAME/VERSION/`` SavedModel directories and/or prebuilt
``NAME/VERSION.tar.gz`` archives, found, listed and sorted.

``NAME`` may contain slashes (``google/mnist/1`` is module ``google/mnist``, version
``1``). When both exist the prebuilt archive wins: the publisher made it on purpose.
Nothing leads out of ROOT: unsafe path segments are refused, and links are followed only
while they stay inside it.

Versions are numbers when they are ASCII digits (``[0-9]+``, as Triton's): they sort
numerically and the highest is the latest. Other names (``beta``, ``²``, ``+1``) are
still served, after the numbers, and are the latest only where there is no number. An
archive is a version only once it is whole (:func:`is_whole`), so a half-copied
``2.tar.gz`` is neither listed, served nor the latest.

Plain blocking functions over the file system (the app runs them in worker threads),
shared by the module host (``hosting.py``) and the inference endpoint (``infer.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._archive import gzip_backend
from .._pack import MODULE_MARKERS, is_module_dir

__all__ = [
    "ARCHIVE_SUFFIX",
    "ModuleSource",
    "is_whole",
    "latest",
    "locate",
    "scan",
    "split_module_path",
    "version_key",
    "version_number",
    "versions",
]

ARCHIVE_SUFFIX = ".tar.gz"

logger = logging.getLogger("asynchub.server")

_GZIP_MAGIC = b"\x1f\x8b"
_READ = 1 << 20
# Bound on what one decompress() call may produce (a small archive of zeros inflates
# a thousandfold).
_INFLATE = 4 << 20
# A file modified this recently may still change within the same mtime tick (file
# systems stamp with a coarse clock): its verdict is not remembered.
_SETTLE_NS = 2_000_000_000
_MEMO_LIMIT = 4096
# (device, inode, size, mtime_ns) -> whether the archive is whole; shared by every app
# in the process, so a finished file is read once.
_whole: dict[tuple[int, int, int, int], bool] = {}
_whole_lock = threading.Lock()


@dataclass(frozen=True)
class ModuleSource:
    """Where module ``name``/``version`` comes from: a prebuilt archive or a directory."""

    name: str
    version: str
    path: Path
    prebuilt: bool

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"


def split_module_path(path: str) -> tuple[str, str] | None:
    """``"google/mnist/1"`` -> ``("google/mnist", "1")``; ``None`` for anything unsafe.

    ``path`` is the percent-decoded URL path without its leading slash. Empty, ``.``,
    ``..`` and hidden segments, backslashes and NUL are refused, so no spelling of a path
    (``..``, ``%2e%2e``, ``//etc``) leaves ROOT.
    """
    segments = path.split("/")
    if len(segments) < 2:
        return None
    for segment in segments:
        if not segment or segment.startswith(".") or "\\" in segment or "\x00" in segment:
            return None
    return "/".join(segments[:-1]), segments[-1]


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (links followed) to somewhere under ``root`` (resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # unreadable, or a link loop
        return False


def locate(root: Path, name: str, version: str) -> ModuleSource | None:
    """The module ``name``/``version`` under ``root`` (resolved), or ``None``.

    A prebuilt ``NAME/VERSION.tar.gz`` wins over a ``NAME/VERSION/`` directory once it
    is whole (:func:`is_whole`); until then the directory, if any, is served. Links
    under ``root`` are followed only while they stay inside ``root``; nothing inside a
    module directory (``demo/1/assets/...``) is a module of its own.
    """
    try:
        parent = root / name
        ancestors = [parent, *parent.parents[: len(Path(name).parts) - 1]]
        if any(is_module_dir(a) for a in ancestors):
            return None
        archive = parent / f"{version}{ARCHIVE_SUFFIX}"
        if archive.is_file() and _inside(root, archive) and is_whole(archive):
            return ModuleSource(name, version, archive, prebuilt=True)
        directory = parent / version
        if is_module_dir(directory) and _inside(root, directory):
            return ModuleSource(name, version, directory, prebuilt=False)
    except (OSError, ValueError):  # e.g. a segment too long for the file system
        pass
    return None


def version_number(version: str) -> int | None:
    """``"10"`` -> 10; ``None`` unless ``version`` is ASCII digits only.

    ``str.isdigit`` alone would take ``"²"`` (which ``int`` refuses) and ``"\\u0661"`` (an
    Arabic-Indic one, which ``int`` reads as 1); ``int`` alone would take ``" 1"`` and
    ``"+1"``. Neither is a number a person would sort by.
    """
    return int(version) if version.isascii() and version.isdigit() else None


def version_key(source: ModuleSource) -> tuple[str, bool, int, str]:
    """How modules sort: by name, then numeric versions in numeric order (2 before 10),
    others after them by name."""
    number = version_number(source.version)
    return source.name, number is None, number or 0, source.version


def _loops(root: Path, here: Path) -> bool:
    """Whether ``here`` resolves to one of its own ancestors (a link loop)."""
    real = os.path.realpath(here)
    parts = here.relative_to(root).parts
    return any(os.path.realpath(root.joinpath(*parts[:i])) == real for i in range(len(parts)))


def scan(root: Path) -> list[ModuleSource]:
    """Every module under ``root`` (resolved), sorted by name and version, archives winning.

    Links are followed like :func:`locate` follows them: only while they stay inside root.
    """
    found: dict[str, ModuleSource] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if not _inside(root, here) or _loops(root, here):
            dirnames[:] = []
            continue
        parts = here.relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if parts and any(marker in filenames for marker in MODULE_MARKERS):
            dirnames[:] = []  # a module's own subdirectories are not modules
            if len(parts) >= 2:
                source = ModuleSource("/".join(parts[:-1]), parts[-1], here, prebuilt=False)
                found.setdefault(source.id, source)
            continue
        for filename in filenames if parts else ():
            version = filename.removesuffix(ARCHIVE_SUFFIX)
            path = here / filename
            if (
                version != filename
                and version
                and not filename.startswith(".")
                and path.is_file()
                and _inside(root, path)
                and is_whole(path)
            ):
                source = ModuleSource("/".join(parts), version, path, prebuilt=True)
                found[source.id] = source
    return sorted(found.values(), key=version_key)


def _safe(segment: str) -> bool:
    # The same test as the protocol's paths (oip.py), which imports nothing of this package.
    return bool(segment) and not segment.startswith(".") and not ({"\\", "\x00"} & set(segment))


def versions(root: Path, name: str) -> list[ModuleSource]:
    """The versions of module ``name`` under ``root`` (resolved), oldest first.

    Numeric versions in numeric order (``2`` before ``10``), then the others; a
    ``V.tar.gz`` archive wins over a ``V/`` directory, as for downloads.
    """
    try:
        entries = os.listdir(root / name)
    except (OSError, ValueError):
        return []
    found: dict[str, ModuleSource] = {}
    for entry in entries:
        version = entry.removesuffix(ARCHIVE_SUFFIX)
        if _safe(entry) and version and version not in found:
            source = locate(root, name, version)
            if source is not None:
                found[version] = source
    return sorted(found.values(), key=version_key)


def latest(found: Sequence[ModuleSource]) -> str | None:
    """The version a request without one gets: the highest number, else the last name."""

    def rank(source: ModuleSource) -> tuple[bool, int, str]:
        number = version_number(source.version)
        return number is not None, number or 0, source.version

    return max(found, key=rank).version if found else None


# -- whole archives ---------------------------------------------------------------------------


def is_whole(archive: Path) -> bool:
    """Whether ``archive`` is complete: its gzip stream ends in a valid trailer (CRC and
    length checked), or, for a plain tar, it ends with tar's two zero blocks.

    A file still being copied into ROOT is not, so it is no version yet. Reads the file
    once per (device, inode, size, mtime): a finished file is checked once per process.
    Blocking; ``False`` when the file cannot be read.
    """
    try:
        with open(archive, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with _whole_lock:
                known = _whole.get(key)
            if known is not None:
                return known
            whole = _stream_is_whole(f)
            after = os.fstat(f.fileno())
    except OSError:
        return False
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return False  # it grew while it was read: look again next time
    if 0 <= time.time_ns() - st.st_mtime_ns < _SETTLE_NS:
        # Maybe written to again within the same mtime tick. (A file dated in the future,
        # by a skewed clock, is remembered: else it would be read on every request.)
        return whole
    if not whole:
        logger.warning(
            "%s is not a whole archive (truncated, or still being copied): it is not "
            "served until it is; copy archives under another name and rename them",
            archive,
        )
    with _whole_lock:
        if len(_whole) >= _MEMO_LIMIT:
            _whole.clear()  # forgetting only costs a read
        _whole[key] = whole
    return whole


def _stream_is_whole(f: BinaryIO) -> bool:
    head = f.read(_READ)
    if not head.startswith(_GZIP_MAGIC):
        # A plain tar: whole when it ends with the two zero blocks tar writes last.
        size = os.fstat(f.fileno()).st_size
        if size < 1024 or size % 512:
            return False
        f.seek(size - 1024)
        return not any(f.read(1024))
    _, zlib = gzip_backend()
    inflater = zlib.decompressobj(31)  # gzip framing: header, CRC-32 and length checked
    data, capped = head, False
    try:
        while True:
            if not data and not capped:
                data = f.read(_READ)
                if not data:
                    return False  # the file ends inside the stream
            # Output held back by the cap comes out of the next call, even without input.
            capped = len(inflater.decompress(data, _INFLATE)) == _INFLATE
            data = inflater.unconsumed_tail
            if inflater.eof:
                data, capped = inflater.unused_data + data, False
                while len(data) < 2 and (more := f.read(_READ)):
                    data += more
                if data == _GZIP_MAGIC[:1]:
                    return False  # the first byte of a further member
                if not data.startswith(_GZIP_MAGIC):
                    return True  # the end, maybe with zero padding (which gzip ignores)
                inflater = zlib.decompressobj(31)  # a further member
    except (zlib.error, ValueError, OSError):
        return False
