"""Streaming extraction of a module archive: gunzip, check each tar member, write it.

Everything here is blocking and runs in a worker thread. Bytes come from a
``pull()`` function that returns the next compressed chunk (``b""`` at the end),
so the same code extracts a network stream and a local file, and memory stays
bounded by one chunk plus tarfile's buffer whatever the archive's size.

An archive counts as whole only if the tar reaches its end-of-archive block (and
a gzip stream its end): bytes that stop short raise TruncatedArchiveError, which a
network source may retry, while bytes that are complete but wrong raise a plain
ArchiveError.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import posixpath
import queue
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable, Container, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ._config import GZIP_BACKENDS, MAX_EXTRACT_MEMBERS
from ._integrity import tree_digest
from .errors import ArchiveError, ConfigError, TruncatedArchiveError, UnsafeArchiveError

__all__ = [
    "GZIP_BACKENDS",
    "Manifest",
    "check_conflict",
    "check_member",
    "extract",
    "gzip_backend",
    "sniff",
]

GZIP_MAGIC = b"\x1f\x8b"
# GZIP_BACKENDS (from _config, preferred first): each is a drop-in for zlib's decompressobj.
_BACKEND_MODULES = {"isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng", "zlib": "zlib"}
_COPY = 1024 * 1024
_ContentType = str | None | Callable[[], str | None]
_MAX_INFLATE = 4 * 1024 * 1024  # bound on bytes one decompress() call may produce
# Bounds on a member's path: deeper and longer than any module's, and within what
# file systems take (NAME_MAX 255 bytes; PATH_MAX 4096 with the cache dir in front),
# so a hostile name is an UnsafeArchiveError, not an OSError from the disk.
_MAX_DEPTH = 64
_MAX_PATH = 1024  # bytes (UTF-8) of the path below the module root
_MAX_COMPONENT = 255
# tarfile reads an extended header (a GNU long name, pax records) whole into memory
# and the header after it by recursion; both are bounded before it does either.
_MAX_EXTENDED = 1024 * 1024
_MAX_EXTENDED_CHAIN = 8
_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    tarfile.XHDTYPE: "pax header",
    tarfile.XGLTYPE: "global pax header",
    tarfile.SOLARIS_XHDTYPE: "Solaris pax header",
}
# Part of tarfile since Python 3.2, though missing from typeshed's stubs.
_EOFHeaderError: type[tarfile.HeaderError] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_SubsequentHeaderError: type[tarfile.HeaderError] = tarfile.SubsequentHeaderError  # type: ignore[attr-defined]


@dataclass
class Manifest:
    """What an extraction wrote: each file's size, relative to the module root.

    ``sha256`` (hex) and ``archive_bytes`` describe the archive exactly as pulled
    (compressed, trailing padding included), not what it extracts to.
    ``file_sha256`` holds each file's sha256 when extraction was asked for it.
    """

    files: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    compressed: bool = False
    sha256: str = ""
    archive_bytes: int = 0
    file_sha256: dict[str, str] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def tree_sha256(self) -> str | None:
        """The content digest (``_integrity.tree_digest``), if every file was hashed."""
        if self.file_sha256 is None:
            return None
        return tree_digest(self.files, self.file_sha256)


def gzip_backend(name: str | None = None) -> tuple[str, ModuleType]:
    """The gzip implementation to use: ``name`` if given, else the fastest importable one."""
    names = (name,) if name else GZIP_BACKENDS
    for candidate in names:
        if candidate not in _BACKEND_MODULES:
            raise ConfigError(f"unknown gzip backend {candidate!r}; choose from {GZIP_BACKENDS}")
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


class _Hasher:
    """sha256 of the pulled chunks, computed in a thread of its own.

    hashlib drops the GIL for large updates, so hashing beside the inflater
    (which drops it too) costs no time on the extraction thread, the one that
    bounds a download: about 0.1 s per 150 MB there otherwise.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="asynchub-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._sha.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()


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
        self._errors: tuple[type[Exception], ...] = (zlib.error, backend.error)
        self._eof = False
        # Hashed as pulled, one update per chunk, in a thread of its own.
        self._sha = _Hasher()
        self.archive_bytes = 0
        #: Set when a read came up short: the tar wanted bytes past the end.
        self.starved = False
        try:
            head = self._fill_raw(512)
            # Read the content type only now: for a download it is known once bytes arrive.
            ctype = content_type() if callable(content_type) else content_type
            self.kind = sniff(head[:512], ctype)
        except BaseException:
            self._sha.close()
            raise
        self._raw = head
        self._dec: Any = backend.decompressobj(wbits=31) if self.kind == "gzip" else None
        self._head = b""  # the piece being read from, and the offset into it
        self._off = 0

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        self._sha.close()

    def _take(self) -> bytes:
        chunk = self._pull()
        if chunk:
            self._sha.update(chunk)
        self.archive_bytes += len(chunk)
        return chunk

    def _fill_raw(self, n: int) -> bytes:
        pieces: list[bytes] = []
        size = 0
        while size < n:
            chunk = self._take()
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
        chunk = self._take()
        if not chunk:
            self._eof = True
        return chunk

    def _produce(self) -> bytes:
        """Return the next piece of tar bytes, ``b""`` at the end."""
        if self._dec is None:
            return self._next_raw()
        try:
            return self._inflate()
        except self._errors as exc:
            # Wrapped here, not left to tarfile: it would turn zlib's error (but not
            # isal's) into a ReadError, so the message would depend on the back-end.
            raise ArchiveError(f"corrupt gzip data: {exc}") from exc

    def _inflate(self) -> bytes:
        while True:
            tail = self._dec.unconsumed_tail
            if tail:
                out: bytes = self._dec.decompress(tail, _MAX_INFLATE)
            elif self._dec.eof:
                if not self._next_member():
                    return b""
                continue
            else:
                data = self._next_raw()
                if not data:
                    raise TruncatedArchiveError(
                        "the gzip stream ends early: the archive is truncated"
                    )
                out = self._dec.decompress(data, _MAX_INFLATE)
            if out:
                return out

    def _next_member(self) -> bool:
        """After a gzip member, start the next one; False if only zero padding follows."""
        rest = self._dec.unused_data
        # A chunk may end between the two magic bytes.
        while len(rest) < len(GZIP_MAGIC) and (more := self._next_raw()):
            rest += more
        if rest.startswith(GZIP_MAGIC):
            self._dec = self._backend.decompressobj(wbits=31)
            self._raw = rest  # pushed back for _next_raw, already hashed
            return True
        # Zero padding after the last member (a block device, some servers) is
        # pulled and skipped. The finished decompressor keeps its unused_data, so
        # a later call comes back here and finds the pull exhausted.
        while rest:
            if rest.strip(b"\0"):
                raise ArchiveError("trailing garbage after the gzip stream")
            rest = self._next_raw()
        return False

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
                    # tarfile asks for exactly what it needs (a header, a member's
                    # data, a padding byte): a short answer means the tar is cut.
                    self.starved = True
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


class _Forward:
    """The tar stream as a file that seeks forward only, for tarfile's random-access mode.

    tarfile's stream mode (``r|``) buffers through its own ``_Stream``, which
    joins and slices every read: about four copies of each byte with the GIL
    held, the extraction thread's largest cost after inflating (py-spy). Read
    in member order, random-access mode only ever seeks forward (past padding,
    or to where it already is), so the inflated pieces reach the file writes
    with one copy. A backward seek would mean re-reading: refused.
    """

    def __init__(self, source: _Inflater) -> None:
        self._source = source
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise ArchiveError("the archive is read as a stream: it cannot seek from its end")
        if pos < self._pos:
            raise ArchiveError(
                f"the tar archive asks to go back from byte {self._pos:,} to {pos:,}; "
                "a streamed archive is read once, in order"
            )
        while pos > self._pos:
            if not self.read(min(pos - self._pos, _COPY)):
                break  # at the end: the next read tells tarfile so
        return self._pos


class _TarInfo(tarfile.TarInfo):
    """A TarInfo that tells its _ReadTar which header error ended the member list.

    It also bounds what tarfile would read unbounded: an extended header's size,
    a run of extended headers, and a sparse file's map.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _TarInfo:
        # tarfile reads the header after an extended one by calling this again from
        # inside it: the depth of that recursion is the run of extended headers.
        depth = 0
        if isinstance(tar, _ReadTar):
            depth = tar.extended_run = tar.extended_run + 1
            if depth > _MAX_EXTENDED_CHAIN:
                raise UnsafeArchiveError(
                    f"more than {_MAX_EXTENDED_CHAIN} extended headers in a row "
                    f"(at byte {tar.offset:,}); a member has a few at most"
                )
        # TarFile.next() ends the members on any header it cannot read past the
        # first (an all-zero end block, but also a short or empty read), so only
        # what it caught here tells a real end from a cut one.
        try:
            return super().fromtarfile(tar)
        except _SubsequentHeaderError:
            raise  # made from an inner header error, which was noted already
        except tarfile.HeaderError as exc:
            if isinstance(tar, _ReadTar):
                tar.header_error = exc
            raise
        finally:
            if isinstance(tar, _ReadTar):
                tar.extended_run = depth - 1

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # The hook tarfile calls with a header parsed but nothing after it read yet.
        kind = _EXTENDED.get(self.type)
        if kind is not None and self.size > _MAX_EXTENDED:
            raise UnsafeArchiveError(
                f"a {kind} of {self.size:,} bytes (at byte {self.offset:,}); "
                f"extended headers of more than {_MAX_EXTENDED:,} bytes are refused"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse(self)
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member

    # A pax header's GNU sparse map (formats 0.0, 0.1, 1.0; 1.0's is read from the
    # member's data, as long as it says): refused before it is parsed.
    def _proc_gnusparse_00(self, member: tarfile.TarInfo, *args: Any) -> None:
        raise _sparse(member)

    def _proc_gnusparse_01(self, member: tarfile.TarInfo, *args: Any) -> None:
        raise _sparse(member)

    def _proc_gnusparse_10(self, member: tarfile.TarInfo, *args: Any) -> None:
        raise _sparse(member)


def _sparse(member: tarfile.TarInfo) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"member {member.name!r} is a sparse file; sparse files are refused (their maps "
        "are unbounded, and no module needs one)"
    )


class _ReadTar(tarfile.TarFile):
    tarinfo = _TarInfo
    header_error: tarfile.HeaderError | None = None
    extended_run = 0  #: headers being read, one inside the other (_TarInfo.fromtarfile)

    @property
    def reached_end(self) -> bool:
        """Whether the members ended at an end-of-archive (all-zero) block.

        One zero block is enough: tar writes two, but some writers write one, and
        a cut stream ends with none.
        """
        return isinstance(self.header_error, _EOFHeaderError)


def _normalise(name: str) -> str:
    """The member's path relative to the module root, ``""`` for the root itself."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_member(
    member: tarfile.TarInfo,
    *,
    extracted: int,
    limit: int,
    index: int = 0,
    max_members: int = MAX_EXTRACT_MEMBERS,
) -> str:
    """Refuse an unsafe member before anything of it is written; return its relative path.

    Refused: absolute paths, ``..`` components, paths deeper than 64 levels,
    longer than 1,024 bytes or with a component longer than 255, symlinks,
    hardlinks, devices, fifos and other special types, a member that would take
    the total extracted size past ``limit`` bytes, and the member at ``index``
    (0-based, counting every member: directories and the root too) once
    ``max_members`` came before it.
    """
    name = member.name
    if index >= max_members:
        raise UnsafeArchiveError(
            f"the archive has more than {max_members:,} members (at member {name!r}); "
            "raise max_extract_members if this module really has that many"
        )
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
    rel = _normalise(name)
    _check_path(rel)
    return rel


def _check_path(rel: str) -> None:
    """Refuse a path too deep or too long for any module (and for many file systems)."""
    parts = rel.split("/") if rel else []
    if len(parts) > _MAX_DEPTH:
        raise UnsafeArchiveError(
            f"member {_shown(rel)} is {len(parts)} levels deep; more than {_MAX_DEPTH} are refused"
        )
    size = len(rel.encode("utf-8", "surrogateescape"))
    if size > _MAX_PATH:
        raise UnsafeArchiveError(
            f"member {_shown(rel)} has a path of {size:,} bytes; "
            f"more than {_MAX_PATH:,} are refused"
        )
    for part in parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > _MAX_COMPONENT:
            raise UnsafeArchiveError(
                f"member {_shown(rel)} has a name of {size:,} bytes ({_shown(part)}); "
                f"more than {_MAX_COMPONENT} are refused"
            )


def _shown(name: str) -> str:
    """A member's name for a message: whole if short, else its start and end."""
    return repr(name) if len(name) <= 120 else f"{name[:60]!r}…{name[-40:]!r}"


def check_conflict(
    rel: str, *, is_dir: bool, files: Container[str], dirs: Mapping[str, str]
) -> None:
    """Refuse a member that clashes with an earlier one, before anything of it is written.

    ``files`` holds the file members so far; ``dirs`` maps every directory so far,
    explicit or implied by a deeper member (``a/b/c`` implies ``a`` and ``a/b``), to
    the member that made it one, and holds each directory's parents too (as
    ``_add_dirs`` keeps it). Refused: a directory where a file is, a file where a
    directory is, and anything below a file. A repeated file or directory is
    allowed: as in tar, the later file wins.
    """
    if is_dir:
        if rel in files:
            raise UnsafeArchiveError(
                f"directory member {rel!r} clashes with the earlier file member {rel!r}"
            )
    elif rel in dirs:
        raise UnsafeArchiveError(
            f"file member {rel!r} clashes with the directory {rel!r} "
            f"made by the earlier member {dirs[rel]!r}"
        )
    parent = rel.rpartition("/")[0]
    # A parent already known as a directory had its own parents checked when added.
    while parent and parent not in dirs:
        if parent in files:
            raise UnsafeArchiveError(
                f"member {rel!r} lies below {parent!r}, which the earlier member "
                f"{parent!r} made a file"
            )
        parent = parent.rpartition("/")[0]


def _add_dirs(rel: str, *, is_dir: bool, dirs: MutableMapping[str, str]) -> None:
    """Note the directories a checked member makes: itself if a directory, and its parents."""
    path = rel if is_dir else rel.rpartition("/")[0]
    while path and path not in dirs:
        dirs[path] = rel
        path = path.rpartition("/")[0]


def extract(
    pull: Callable[[], bytes],
    dest: Path,
    *,
    limit: int,
    max_members: int = MAX_EXTRACT_MEMBERS,
    content_type: _ContentType = None,
    backend: str | None = None,
    file_digests: bool = False,
) -> Manifest:
    """Extract the tar or tar.gz stream that ``pull`` yields into the existing dir ``dest``.

    Raises ArchiveError on a corrupt archive, UnsafeArchiveError on an unsafe one
    (more than ``limit`` bytes or ``max_members`` members among the reasons) and
    TruncatedArchiveError on one that ends early; the caller removes ``dest``
    then. Every pulled byte is counted and hashed into the manifest; with
    ``file_digests`` every file written is hashed too (about 15 % more time in
    this thread, so only when asked: see docs/design.md).
    """
    _, module = gzip_backend(backend)
    source = _Inflater(pull, module, content_type)
    try:
        return _extract(
            source, dest, limit=limit, max_members=max_members, file_digests=file_digests
        )
    finally:
        source.close()


def _extract(
    source: _Inflater, dest: Path, *, limit: int, max_members: int, file_digests: bool
) -> Manifest:
    manifest = Manifest(compressed=source.kind == "gzip")
    sums: dict[str, str] | None = {} if file_digests else None
    dest_real = os.path.realpath(dest)
    extracted = 0
    dirs: dict[str, str] = {}  # every directory, explicit or implied: the member behind it
    try:
        tar: _ReadTar
        with _ReadTar(fileobj=_Forward(source), mode="r") as tar:  # type: ignore[arg-type]
            for index, member in enumerate(tar):
                rel = check_member(
                    member, extracted=extracted, limit=limit, index=index, max_members=max_members
                )
                if not rel:
                    continue
                is_dir = member.isdir()
                check_conflict(rel, is_dir=is_dir, files=manifest.files, dirs=dirs)
                if is_dir and rel in manifest.dirs:
                    continue  # made already: a repeated directory costs no syscall
                target = os.path.join(dest_real, *rel.split("/"))
                # check_member rules out escapes; this guards the rule itself.
                if os.path.commonpath([dest_real, os.path.realpath(target)]) != dest_real:
                    raise UnsafeArchiveError(f"member {member.name!r} would be written outside")
                _add_dirs(rel, is_dir=is_dir, dirs=dirs)
                if is_dir:
                    os.makedirs(target, exist_ok=True)
                    manifest.dirs.add(rel)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                sha = hashlib.sha256() if sums is not None else None
                extracted += _write_member(tar, member, target, sha)
                manifest.files[rel] = member.size
                if sums is not None and sha is not None:
                    sums[rel] = sha.hexdigest()
            if not tar.reached_end:
                if source.starved:
                    raise TruncatedArchiveError(
                        "the archive ends before its end-of-archive blocks: truncated"
                    )
                raise ArchiveError(
                    f"corrupt tar archive: a bad header at byte {tar.offset:,} "
                    f"({tar.header_error or 'no end-of-archive block'})"
                )
        source.drain()
    except (tarfile.TarError, EOFError) as exc:
        # tarfile reports a cut stream as a ReadError or EOFError; whether tarfile
        # asked for bytes past the end tells that apart from corrupt bytes.
        if source.starved:
            raise TruncatedArchiveError(f"the archive is truncated: {exc}") from exc
        raise ArchiveError(f"corrupt tar archive: {exc}") from exc
    manifest.sha256 = source.sha256
    manifest.archive_bytes = source.archive_bytes
    manifest.file_sha256 = sums
    return manifest


def _write_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, target: str, sha: Any = None
) -> int:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - regular files always have data
        raise ArchiveError(f"member {member.name!r} has no data")
    written = 0
    with open(target, "wb") as out:
        while True:
            block = src.read(_COPY)
            if not block:
                break
            if sha is not None:
                sha.update(block)
            out.write(block)
            written += len(block)
    if written != member.size:
        raise TruncatedArchiveError(
            f"member {member.name!r} is truncated ({written} of {member.size} bytes)"
        )
    return written
