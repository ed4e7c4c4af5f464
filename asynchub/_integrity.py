"""Pinned digests: what a pin is, the module's content digest, lock files.

Pure functions and small values, apart from reading and writing a lock file.

Two digests describe a module:

- the **archive digest**: sha256 of the archive's bytes exactly as fetched (what
  ``sha256sum m.tar.gz`` prints). It is what ``digest="sha256:..."``, a
  ``#sha256=`` fragment and a lock file's ``sha256`` pin.
- the **content digest** (``tree_sha256``): sha256 over the sorted list of the
  module's files, each with its size and sha256. It does not depend on how the
  archive was packed or compressed, so it is what proves a mirror's copy (a
  re-pack made by ``asynchub mirror push``) holds the same module. A lock file
  records it beside the archive digest; a ``s3://``/``gs://`` prefix handle,
  which has no archive, is pinned by it alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HandleError, IntegrityError

__all__ = [
    "LOCK_FORMAT",
    "LockEntry",
    "Pin",
    "parse_digest",
    "pin_of",
    "read_lock",
    "split_fragment",
    "tree_digest",
    "write_lock",
]

LOCK_FORMAT = "asynchub-lock/1"
_HEX = re.compile(r"^[0-9a-f]{64}$")
_FRAGMENT = "#sha256="


def parse_digest(value: str, *, handle: str | None = None) -> str:
    """``"sha256:<64 hex>"`` (or the bare hex) as lower-case hex; HandleError otherwise."""
    text = value.strip()
    if text.lower().startswith("sha256:"):
        text = text[7:]
    text = text.lower()
    if not _HEX.match(text):
        raise HandleError(
            f"{handle + ': ' if handle else ''}digest {value!r} is not 'sha256:' followed by "
            "64 hex digits",
            handle=handle,
        )
    return text


def split_fragment(text: str) -> tuple[str, str | None]:
    """``(handle without its #sha256= fragment, the digest)``; the digest is None if there is none.

    The fragment is stripped before the cache key is computed, so the key of a
    pinned handle stays tensorflow_hub's. A handle takes one fragment: a
    second (prefetch's ``digests=`` on a handle pinned already, say) is a
    HandleError, never part of the cache key.
    """
    base, sep, value = text.rpartition(_FRAGMENT)
    if not sep:
        return text, None
    if _FRAGMENT in base:
        raise HandleError(
            f"{text}: #sha256= is given twice; a handle takes one digest", handle=text
        )
    return base, parse_digest(value, handle=text)


def tree_digest(files: Mapping[str, int], sha256: Mapping[str, str]) -> str:
    """The content digest of a module: its files' paths, sizes and sha256, in path order."""
    digest = hashlib.sha256(b"asynchub-tree/1\n")
    for path in sorted(files):
        digest.update(f"{sha256[path]} {files[path]} {json.dumps(path)}\n".encode())
    return digest.hexdigest()


def short(digest: str | None) -> str:
    return "none" if digest is None else f"sha256:{digest[:16]}…"


@dataclass(frozen=True)
class Pin:
    """What a download must match before it is committed.

    ``sha256``/``size`` pin the archive's bytes; ``tree`` pins the module's
    content. ``origin`` says where the pin came from, for messages.
    """

    sha256: str | None = None
    size: int | None = None
    tree: str | None = None
    origin: str = "digest argument"

    @property
    def name(self) -> str | None:
        """The digest that names the pin's own cache entry: the content digest if pinned.

        Every entry committed under this name satisfies every pin of this name
        (a content pin's downloads are hashed and checked file by file), so a
        complete one never needs replacing.
        """
        return self.tree or self.sha256

    def problem(
        self, *, sha256: str | None, size: int | None, tree: str | None, mirror: bool
    ) -> str | None:
        """Why a download does not satisfy the pin, in a phrase; None if it does.

        From the origin the archive digest decides (the content digest when
        that is all the pin has), and a content digest computed too must match
        as well. From a mirror, which holds a re-pack, the content digest
        decides; a pin without one accepts only the very archive.
        """
        if mirror and self.tree is not None:
            return None if tree == self.tree else f"content {short(tree)} != {short(self.tree)}"
        if self.sha256 is not None:
            if self.size is not None and size is not None and size != self.size:
                return f"{size:,} bytes, the pin says {self.size:,}"
            if sha256 != self.sha256:
                return f"archive {short(sha256)} != {short(self.sha256)}"
            if self.tree is not None and tree is not None and tree != self.tree:
                # The right archive whose files are not the pinned content: the
                # lock file contradicts itself. Refused rather than trusted.
                return f"content {short(tree)} != {short(self.tree)}"
            return None
        if self.tree is not None:
            return None if tree == self.tree else f"content {short(tree)} != {short(self.tree)}"
        return None

    def satisfied_by(self, sha256: str | None, tree: str | None) -> bool:
        """Whether a cache entry recorded with these digests holds the pinned module."""
        if self.sha256 is not None and sha256 == self.sha256:
            return True
        return self.tree is not None and tree == self.tree

    def agree(self, other: Pin, handle: str) -> Pin:
        """Both pins, or HandleError if they name different bytes (digests of one type)."""
        for mine, theirs in ((self.sha256, other.sha256), (self.tree, other.tree)):
            if mine is not None and theirs is not None and mine != theirs:
                raise HandleError(
                    f"{handle}: the {self.origin} pins {short(mine)} but the {other.origin} "
                    f"pins {short(theirs)}; give one digest",
                    handle=handle,
                )
        return Pin(
            sha256=self.sha256 or other.sha256,
            size=self.size if self.size is not None else other.size,
            tree=self.tree or other.tree,
            origin=f"{self.origin} and {other.origin}",
        )


def pin_of(
    given: list[tuple[str, str]], lock: Pin | None, *, prefix: bool, handle: str
) -> Pin | None:
    """One pin from the digests ``given`` as ``(hex, where from)`` and the lock file's entry.

    A given digest has no type of its own. With a lock entry it must equal one
    of the entry's two digests, and the pin is the entry's (both digests and
    the size); alone it pins the archive, or a prefix's content (a prefix has
    no archive). Digests that disagree are a HandleError.
    """
    for (first, origin), (digest, where) in itertools.pairwise(given):
        if digest != first:
            raise HandleError(
                f"{handle}: the {origin} pins {short(first)} but the {where} pins "
                f"{short(digest)}; give one digest",
                handle=handle,
            )
    if lock is not None:
        for digest, where in given:
            if digest not in (lock.sha256, lock.tree):
                raise HandleError(
                    f"{handle}: the {where} pins {short(digest)} but the {lock.origin} pins "
                    f"{short(lock.sha256 or lock.tree)}; give one digest",
                    handle=handle,
                )
        origins = [where for _, where in given] + [lock.origin]
        return Pin(lock.sha256, lock.size, lock.tree, origin=" and ".join(origins))
    if not given:
        return None
    digest, origin = given[0]
    origin = " and ".join(where for _, where in given)
    return Pin(tree=digest, origin=origin) if prefix else Pin(sha256=digest, origin=origin)


@dataclass(frozen=True)
class LockEntry:
    handle: str
    sha256: str | None  #: of the archive; None for a prefix handle
    size: int | None  #: the archive's bytes
    tree_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "tree_sha256": self.tree_sha256}

    def pin(self, path: Path) -> Pin:
        return Pin(self.sha256, self.size, self.tree_sha256, origin=f"lock file {path}")


def lock_text(entries: list[LockEntry]) -> str:
    modules = {e.handle: e.to_json() for e in sorted(entries, key=lambda e: e.handle)}
    return json.dumps({"format": LOCK_FORMAT, "modules": modules}, indent=2) + "\n"


def write_lock(path: str | os.PathLike[str], entries: list[LockEntry]) -> None:
    """Write a lock file atomically: the whole new file, or the old one (or none) as it was."""
    target = Path(path)
    text = lock_text(entries)  # before any file exists: a failure here leaves nothing
    # Beside the target (one file system, so the rename is atomic), hidden, unique.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_lock(path: str | os.PathLike[str]) -> dict[str, LockEntry]:
    """The lock file's entries by handle; IntegrityError if it cannot be read or is malformed."""
    where = Path(path)
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read the lock file {where}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise IntegrityError(
            f"{where} is not an asynchub lock file (format {LOCK_FORMAT!r}); "
            "make one with 'asynchub lock HANDLE... > asynchub.lock'"
        )
    modules = data.get("modules")
    if not isinstance(modules, dict):
        raise IntegrityError(f"the lock file {where} has no 'modules' object")
    out = {}
    for handle, entry in modules.items():
        try:
            sha = entry.get("sha256")
            size = entry.get("size")
            out[str(handle)] = LockEntry(
                handle=str(handle),
                sha256=None if sha is None else parse_digest(str(sha)),
                size=None if size is None else int(size),
                tree_sha256=parse_digest(str(entry["tree_sha256"])),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"the lock file {where} has a malformed entry for {handle!r}: {exc}"
            ) from exc
    return out
