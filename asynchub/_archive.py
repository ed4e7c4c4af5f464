"""Streaming extraction of a module archive: gunzip, check each tar member, write it.

Everything here is blocking and runs in a worker thread. Bytes come from a
``pull()`` function that returns the next compressed chunk (``b""`` at the end),
so the same code extracts a network stream and a local file, and memory stays
bounded by one chunk plus tarfile's buffer whatever the archive's size.
"""

from __future__ import annotations

import importlib
import os
import posixpath
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ArchiveError, UnsafeArchiveError

__all__ = [
    "GZIP_BACKENDS",
    "Manifest",
    "check_member",
    "extract",
    "gzip_backend",
    "sniff",
]

GZIP_MAGIC = b"\x1f\x8b"
#: Preferred first; each is a drop-in for zlib's decompressobj.
GZIP_BACKENDS = ("isal", "zlib-ng", "zlib")
_BACKEND_MODULES = {"isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng", "zlib": "zlib"}
_COPY = 1024 * 1024
_ContentType = str | None | Callable[[], str | None]
_MAX_INFLATE = 4 * 1024 * 1024  # bound on bytes one decompress() call may produce


@dataclass
class Manifest:
    """What an extraction wrote: each file's size, relative to the module root."""

    files: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    compressed: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def gzip_backend(name: str | None = None) -> tuple[str, ModuleType]:
    """The gzip implementation to use: ``name`` if given, else the fastest importable one."""
    names = (name,) if name else GZIP_BACKENDS
    for candidate in names:
        if candidate not in _BACKEND_MODULES:
            raise ValueError(f"unknown gzip backend {candidate!r}; choose from {GZIP_BACKENDS}")
        try:
            return candidate, importlib.import_module(_BACKEND_MODULES[candidate])
        except ImportError:
            if name:
                raise
    return "zlib", zlib  # pragma: no cover - zlib is always importable


def sniff(head: bytes, content_type: str | None = None) -> str:
    """Classify an archive by its first bytes: ``"gzip"`` or ``"tar"``, else raise ArchiveError."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if _looks_like_tar(head):
        return "tar"
    stripped = head.lstrip()[:64].lower()
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "text/html" or stripped.startswith((b"<!doctype html", b"<html")):
        shown = ctype or "an HTML page"
        raise ArchiveError(
            f"the server returned {shown}, not a tar archive "
            "(is this the module's documentation page rather than its archive?)"
        )
    what = f"content type {ctype}" if ctype else "no content type"
    raise ArchiveError(f"not a tar or tar.gz archive ({what}; first bytes {head[:16]!r})")


def _looks_like_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    if head[257:262] == b"ustar":
        return True
    # Pre-POSIX (v7) headers have no magic: check the header checksum instead.
    try:
        stored = int(head[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(head[:148]) + 8 * 32 + sum(head[156:512])
    return stored == computed


class _Inflater:
    """A file-like ``read(n)`` over pulled chunks, gunzipping when the data is gzip.

    Handles multi-member gzip (as ``gzip -c a b`` writes it) and caps how much one
    decompress call may produce, so a gzip bomb cannot balloon memory.
    """

    def __init__(
        self, pull: Callable[[], bytes], backend: ModuleType, content_type: _ContentType
    ) -> None:
        self._pull = pull
        self._backend = backend
        self._eof = False
        head = self._fill_raw(512)
        # Read the content type only now: for a download it is known once bytes arrive.
        ctype = content_type() if callable(content_type) else content_type
        self.kind = sniff(head[:512], ctype)
        self._raw = head
        self._dec: Any = backend.decompressobj(wbits=31) if self.kind == "gzip" else None
        self._head = b""  # the piece being read from, and the offset into it
        self._off = 0
        self.raw_bytes = 0

    def _fill_raw(self, n: int) -> bytes:
        pieces: list[bytes] = []
        size = 0
        while size < n:
            chunk = self._pull()
            if not chunk:
                self._eof = True
                break
            pieces.append(chunk)
            size += len(chunk)
        return b"".join(pieces)

    def _next_raw(self) -> bytes:
        if self._raw:
            data, self._raw = self._raw, b""
            return data
        if self._eof:
            return b""
        chunk = self._pull()
        if not chunk:
            self._eof = True
        return chunk

    def _produce(self) -> bytes:
        """Return the next piece of tar bytes, ``b""`` at the end."""
        if self._dec is None:
            data = self._next_raw()
            self.raw_bytes += len(data)
            return data
        while True:
            tail = self._dec.unconsumed_tail
            if tail:
                out: bytes = self._dec.decompress(tail, _MAX_INFLATE)
            elif self._dec.eof:
                rest = self._dec.unused_data or self._next_raw()
                if not rest.strip(b"\0"):
                    if not rest:
                        return b""
                    continue  # zero padding after the last member: skip it
                if not rest.startswith(GZIP_MAGIC):
                    raise ArchiveError("trailing garbage after the gzip stream")
                self._dec = self._backend.decompressobj(wbits=31)
                out = self._dec.decompress(rest, _MAX_INFLATE)
            else:
                data = self._next_raw()
                if not data:
                    raise ArchiveError("the gzip stream ends early: the archive is truncated")
                self.raw_bytes += len(data)
                out = self._dec.decompress(data, _MAX_INFLATE)
            if out:
                return out

    def read(self, n: int = -1) -> bytes:
        # Whole pieces are handed out as they are and only a piece that straddles
        # the boundary is sliced: tarfile reads a MiB at a time, so most bytes are
        # never copied here.
        if n < 0:
            n = sys.maxsize
        out: list[bytes] = []
        while n > 0:
            if self._off >= len(self._head):
                self._head, self._off = self._produce(), 0
                if not self._head:
                    break
            available = len(self._head) - self._off
            if self._off == 0 and available <= n:
                out.append(self._head)
                self._off = available
                n -= available
            else:
                take = min(available, n)
                out.append(self._head[self._off : self._off + take])
                self._off += take
                n -= take
        return out[0] if len(out) == 1 else b"".join(out)

    def drain(self) -> None:
        """Consume what is left, so the producer is never left blocked."""
        while self._produce():
            pass


def _normalise(name: str) -> str:
    """The member's path relative to the module root, ``""`` for the root itself."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_member(member: tarfile.TarInfo, *, extracted: int, limit: int) -> str:
    """Refuse an unsafe member before anything of it is written; return its relative path.

    Refused: absolute paths, ``..`` components, symlinks, hardlinks, devices,
    fifos and other special types, and a member that would take the total
    extracted size past ``limit`` bytes.
    """
    name = member.name
    if "\0" in name:
        raise UnsafeArchiveError(f"member name {name!r} contains a NUL byte")
    if name.startswith(("/", "\\")) or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"member {name!r} has a '..' component and would leave the module")
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        raise UnsafeArchiveError(
            f"member {name!r} is a {kind} (to {member.linkname!r}); links are refused"
        )
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"member {name!r} is a device file; devices are refused")
    if member.isfifo():
        raise UnsafeArchiveError(f"member {name!r} is a fifo; fifos are refused")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"member {name!r} has unsupported type {member.type!r}")
    if member.isreg() and extracted + member.size > limit:
        raise UnsafeArchiveError(
            f"the archive extracts to more than {limit:,} bytes (at member {name!r}); "
            "raise max_extract_bytes if this module really is that large"
        )
    return _normalise(name)


def extract(
    pull: Callable[[], bytes],
    dest: Path,
    *,
    limit: int,
    content_type: _ContentType = None,
    backend: str | None = None,
) -> Manifest:
    """Extract the tar or tar.gz stream that ``pull`` yields into the existing dir ``dest``.

    Raises ArchiveError (UnsafeArchiveError) on a corrupt or unsafe archive;
    the caller removes ``dest`` then.
    """
    _, module = gzip_backend(backend)
    source = _Inflater(pull, module, content_type)
    manifest = Manifest(compressed=source.kind == "gzip")
    dest_real = os.path.realpath(dest)
    extracted = 0
    try:
        with tarfile.open(fileobj=source, mode="r|", bufsize=_COPY) as tar:  # type: ignore[call-overload]
            for member in tar:
                rel = check_member(member, extracted=extracted, limit=limit)
                if not rel:
                    continue
                target = os.path.join(dest_real, *rel.split("/"))
                # check_member rules out escapes; this guards the rule itself.
                if os.path.commonpath([dest_real, os.path.realpath(target)]) != dest_real:
                    raise UnsafeArchiveError(f"member {member.name!r} would be written outside")
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    manifest.dirs.add(rel)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                extracted += _write_member(tar, member, target)
                manifest.files[rel] = member.size
        source.drain()
    except tarfile.TarError as exc:
        raise ArchiveError(f"corrupt or truncated tar archive: {exc}") from exc
    except EOFError as exc:
        raise ArchiveError(f"the archive is truncated: {exc}") from exc
    except (zlib.error, module.error) as exc:
        raise ArchiveError(f"corrupt gzip data: {exc}") from exc
    return manifest


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> int:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - regular files always have data
        raise ArchiveError(f"member {member.name!r} has no data")
    written = 0
    with open(target, "wb") as out:
        while True:
            block = src.read(_COPY)
            if not block:
                break
            out.write(block)
            written += len(block)
    if written != member.size:
        raise ArchiveError(
            f"member {member.name!r} is truncated ({written} of {member.size} bytes)"
        )
    return written
