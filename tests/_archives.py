"""Module directories and archives for resolver tests, made on the spot.

The resolver moves bytes and never loads them, so these modules are real
directory trees with a saved_model.pb file but no TensorFlow graph; tests of
loading and applying build real SavedModels elsewhere.
"""

from __future__ import annotations

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
