"""Module directories and archives for resolver tests, made on the spot.

The resolver moves bytes and never loads them, so these modules are real
directory trees with a saved_model.pb file but no TensorFlow graph; tests of
loading and applying build real SavedModels elsewhere.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path


def make_module(root: Path, *, weights: int = 200_000, seed: int = 0) -> Path:
    """A module-shaped tree: saved_model.pb, variables/, assets/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "saved_model.pb").write_bytes(b"\x08\x01" + bytes([seed % 256]) * 64)
    (root / "variables").mkdir(exist_ok=True)
    rng = __import__("random").Random(seed)
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(rng.randbytes(weights))
    (root / "variables" / "variables.index").write_bytes(b"index" * 20)
    (root / "assets").mkdir(exist_ok=True)
    (root / "assets" / "vocab.txt").write_text("a\nb\nc\n")
    return root


def tar_bytes(src: Path, *, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        tar.add(src, arcname=".")
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def evil_tar(kind: str) -> bytes:
    """A tar.gz with a legitimate saved_model.pb and one member of the given unsafe kind."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, data: bytes = b"x", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for k, v in attrs.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        add("saved_model.pb", b"pb")
        if kind == "absolute":
            add("/tmp/asynchub-evil-abs", b"evil")
        elif kind == "dotdot":
            add("variables/../../asynchub-evil-dotdot", b"evil")
        elif kind == "symlink":
            add("link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        elif kind == "hardlink":
            add("hard", type=tarfile.LNKTYPE, linkname="saved_model.pb")
        elif kind == "device":
            add("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        elif kind == "fifo":
            add("fifo", type=tarfile.FIFOTYPE)
        elif kind == "bomb":
            add("variables/big", bytes(4096))
        else:
            raise ValueError(kind)
    return buf.getvalue()


# -- hostile archives: bounded in members, names and headers, not only in bytes ----------


def _header(name: str, kind: bytes, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _gzip_tar(*parts: bytes) -> bytes:
    """A tar.gz of raw tar blocks: ``saved_model.pb``, ``parts``, then the end-of-archive blocks."""
    pb = b"\x08\x01"
    body = b"".join((_header("saved_model.pb", tarfile.REGTYPE, len(pb)), _padded(pb), *parts))
    return gzip.compress(body + bytes(2 * tarfile.BLOCKSIZE), compresslevel=1)


def many_members_tar(count: int, *, kind: str = "dir") -> bytes:
    """A tar.gz of saved_model.pb and ``count`` more members, each tiny or empty.

    ``"dir"``: the same empty directory again and again (nothing to write, so
    only a member limit stops it); ``"file"``: distinct empty files; ``"nested"``:
    one directory per level, ``count`` levels deep.
    """
    if kind == "dir":
        return _gzip_tar(_header("d", tarfile.DIRTYPE) * count)
    if kind == "file":
        return _gzip_tar(*(_header(f"f/{i}", tarfile.REGTYPE) for i in range(count)))
    if kind == "nested":
        return _gzip_tar(*(_header("d/" * (i + 1), tarfile.DIRTYPE) for i in range(count)))
    raise ValueError(kind)


def long_name_tar(kind: str) -> bytes:
    """A tar.gz whose one extra member has an unreasonable name.

    ``"deep"``: 200 directories deep (short components, 400 characters);
    ``"component"``: one 300-character component; ``"path"``: 40 components of
    100 characters (a path of 4,000).
    """
    names = {
        "deep": "a/" * 199 + "f",
        "component": "variables/" + "c" * 300,
        "path": "/".join(["p" * 100] * 40),
    }
    return _gzip_tar(_header(names[kind], tarfile.REGTYPE))


def header_bomb_tar(kind: str, *, size: int = 64 * 1024 * 1024) -> bytes:
    """A tar.gz whose extended headers (GNU long names, pax records) are a bomb.

    ``"longname"``: a GNU long name of ``size`` bytes (tarfile reads a long name
    whole into memory); ``"pax"``: a pax header of ``size`` bytes (likewise);
    ``"chain"``: 5,000 GNU long-name headers in a row (tarfile reads each by
    recursion); ``"global"``: 5,000 global pax headers in a row.
    """
    if kind == "longname":
        name = b"n" * size
        return _gzip_tar(
            _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size + 1),
            _padded(name + b"\0"),
            _header("x", tarfile.REGTYPE),
        )
    if kind == "pax":
        # A pax record is "<its own length> key=value\n".
        body = b" comment=" + b"v" * size + b"\n"
        length = len(body)
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        record = str(length).encode() + body
        return _gzip_tar(
            _header("././@PaxHeader", tarfile.XHDTYPE, len(record)),
            _padded(record),
            _header("x", tarfile.REGTYPE),
        )
    if kind in ("chain", "global"):
        if kind == "chain":
            name = b"a" * 100 + b"\0"
            one = _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name)) + _padded(name)
        else:
            record = b"14 comment=xy\n"
            one = _header("pax_global_header", tarfile.XGLTYPE, len(record)) + _padded(record)
        return _gzip_tar(one * 5000, _header("x", tarfile.REGTYPE))
    raise ValueError(kind)
