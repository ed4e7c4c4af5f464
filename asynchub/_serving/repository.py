"""Modules on disk: a ROOT of ``NAME/VERSION/`` SavedModel directories and/or prebuilt
``NAME/VERSION.tar.gz`` archives, found, listed and sorted.

``NAME`` may contain slashes (``google/mnist/1`` is module ``google/mnist``, version
``1``). When both exist the prebuilt archive wins: the publisher made it on purpose.
Nothing leads out of ROOT: unsafe path segments are refused, and links are followed only
while they stay inside it.

Plain blocking functions over the file system (the app runs them in worker threads),
shared by the module host (``hosting.py``) and the inference endpoint (``infer.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._pack import MODULE_MARKERS, is_module_dir

__all__ = [
    "ARCHIVE_SUFFIX",
    "ModuleSource",
    "latest",
    "locate",
    "scan",
    "split_module_path",
    "version_key",
    "versions",
]

ARCHIVE_SUFFIX = ".tar.gz"


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

    A prebuilt ``NAME/VERSION.tar.gz`` wins over a ``NAME/VERSION/`` directory. Links
    under ``root`` are followed only while they stay inside ``root``; nothing inside a
    module directory (``demo/1/assets/...``) is a module of its own.
    """
    try:
        parent = root / name
        ancestors = [parent, *parent.parents[: len(Path(name).parts) - 1]]
        if any(is_module_dir(a) for a in ancestors):
            return None
        archive = parent / f"{version}{ARCHIVE_SUFFIX}"
        if archive.is_file() and _inside(root, archive):
            return ModuleSource(name, version, archive, prebuilt=True)
        directory = parent / version
        if is_module_dir(directory) and _inside(root, directory):
            return ModuleSource(name, version, directory, prebuilt=False)
    except (OSError, ValueError):  # e.g. a segment too long for the file system
        pass
    return None


def version_key(source: ModuleSource) -> tuple[str, int, str]:
    """How modules sort: by name, then numeric versions in numeric order (2 before 10),
    others after them."""
    version = source.version
    return source.name, int(version) if version.isdigit() else 1 << 62, version


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
    numbered = [s.version for s in found if s.version.isdigit()]
    if numbered:
        return numbered[-1]  # versions() sorts numbers numerically
    return found[-1].version if found else None
