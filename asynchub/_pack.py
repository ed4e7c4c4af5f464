"""Pack a module directory into a reproducible ``tar.gz`` (the ``compressed`` hub format).

The same directory always gives the same bytes (with the same Python and zlib), so an
archive's hash is a stable HTTP ETag and archives can be compared and cached by content.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ModuleError

__all__ = ["MODULE_MARKERS", "PACK_FORMAT", "fingerprint", "is_module_dir", "pack"]

#: A directory holding one of these files is a SavedModel (a module root).
MODULE_MARKERS = ("saved_model.pb", "saved_model.pbtxt")

#: Bumped whenever ``pack`` would write different bytes for the same directory, so
#: caches keyed by :func:`fingerprint` never serve an archive of an older layout.
PACK_FORMAT = 1

# Fixed metadata: nothing about the publisher's machine, account or clock reaches the
# archive. mtime 0 is the reproducible-builds convention; uid/gid 0 with empty user and
# group names is what `tar --owner=0 --group=0 --numeric-owner` writes, so extractors
# fall back to the extracting user and no account name leaks.
_MTIME = 0
_FILE_MODE = 0o644
_DIR_MODE = 0o755
# zlib's default level: nearly the size of level 9 at a fraction of its time.
_COMPRESSLEVEL = 6


def is_module_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding ``saved_model.pb`` or ``saved_model.pbtxt``."""
    return path.is_dir() and any((path / marker).is_file() for marker in MODULE_MARKERS)


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Yield ``(archive name, path, lstat)`` depth-first, children sorted by name.

    A parent always comes before its children, so the archive extracts in one pass.
    Links and special files are refused: consumers refuse them too, and following a
    link could pull files from outside the module into the archive.
    """

    def visit(directory: Path, prefix: str) -> Iterator[tuple[str, Path, os.stat_result]]:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ModuleError(f"cannot list {directory}: {exc}") from exc
        for name in names:
            path = directory / name
            st = path.lstat()
            arcname = f"{prefix}/{name}"
            if stat.S_ISLNK(st.st_mode):
                raise ModuleError(
                    f"{path} is a symbolic link; module archives never contain links. "
                    "Replace it with a copy of its target (e.g. `cp -rL`)."
                )
            if stat.S_ISDIR(st.st_mode):
                yield arcname, path, st
                yield from visit(path, arcname)
            elif stat.S_ISREG(st.st_mode):
                yield arcname, path, st
            else:
                raise ModuleError(
                    f"{path} is not a regular file or directory (device, fifo or socket)"
                )

    yield ".", root, root.stat()
    yield from visit(root, ".")


def _check_source(src: Path) -> Path:
    if not src.is_dir():
        raise ModuleError(f"{src} is not a directory; pack needs a SavedModel directory")
    if not is_module_dir(src):
        raise ModuleError(
            f"{src} is not a SavedModel: it holds neither saved_model.pb nor saved_model.pbtxt"
        )
    return src.resolve()


def fingerprint(src_dir: str | os.PathLike[str]) -> str:
    """A hex digest of the directory's file names, kinds, sizes and mtimes.

    Cheap (stat calls only); it changes whenever :func:`pack` could produce different
    bytes, and is used as a cache key for packed archives.
    """
    src = _check_source(Path(src_dir))
    digest = hashlib.sha256(f"asynchub-pack-{PACK_FORMAT}\0".encode())
    for arcname, _path, st in _walk(src):
        kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
        size = 0 if kind == "d" else st.st_size
        digest.update(f"{arcname}\0{kind}\0{size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _tarinfo(arcname: str, *, is_dir: bool, size: int) -> tarfile.TarInfo:
    # Built by hand rather than with TarFile.gettarinfo: that one records hard links
    # (shared inodes) as LNKTYPE members, and copies the real owner and mtime.
    info = tarfile.TarInfo(arcname)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = _DIR_MODE if is_dir else _FILE_MODE
    info.size = 0 if is_dir else size
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(src_dir: str | os.PathLike[str], dst_file: str | os.PathLike[str]) -> Path:
    """Write ``src_dir`` as a reproducible ``tar.gz`` at ``dst_file`` and return its path.

    The archive's root is the module root (members ``./``, ``./saved_model.pb``,
    ``./variables/...``), members are sorted, owner/group are 0, mtimes are 0, modes are
    0o644 (files) / 0o755 (dirs) and the gzip header carries no name and mtime 0. The
    file appears atomically: it is written beside ``dst_file`` (parent directories are
    created) and renamed into place.
    Raises :class:`ModuleError` when ``src_dir`` is not a SavedModel directory or holds
    a link or special file.
    """
    src = _check_source(Path(src_dir))
    dst = Path(dst_file).absolute()
    if dst.is_dir():
        raise ModuleError(f"{dst} is a directory; pass the archive's file name")
    if dst.exists() and not dst.is_file():
        # The rename would replace a device (/dev/full), a fifo or a socket with the archive.
        raise ModuleError(f"{dst} is not a regular file; pass a new path or a file to replace")
    if dst.parent.resolve().is_relative_to(src):
        # The half-written archive would be walked into itself.
        raise ModuleError(f"cannot write the archive {dst} inside the module directory {src}")
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # "xb" creates the file with the usual 0o666 & ~umask, like any published file.
        with (
            open(tmp, "xb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=_COMPRESSLEVEL, mtime=0
            ) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for arcname, path, st in _walk(src):
                if stat.S_ISDIR(st.st_mode):
                    tar.addfile(_tarinfo(arcname, is_dir=True, size=0))
                    continue
                with open(path, "rb") as f:
                    # The size comes from the open file, so a file replaced meanwhile is
                    # either packed whole or fails with "unexpected end of data".
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(_tarinfo(arcname, is_dir=False, size=size), f)
            # Flushed before the rename so the archive is complete when it appears.
            tar.close()
            gz.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, tarfile.TarError)):
            raise ModuleError(f"cannot pack {src} into {dst}: {exc}") from exc
        raise
    return dst
