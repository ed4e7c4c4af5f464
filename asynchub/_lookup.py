"""A handle's pin and its cache hit, as functions of a config: no hub, no HTTP client.

:class:`~asynchub._hub.AsyncHub` pins and looks up through these; :func:`cached`
does the whole of a cache hit in the caller's thread for a process that has no
hub yet. It imports neither httpx nor the download machinery (about 0.15 s of
imports), so a Ray Data actor whose node was warmed by ``prefetch_on_nodes``
goes straight from its handle to TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._config import RUNTIME_OPTIONS, HubConfig
from ._handles import HandleKind, ParsedHandle, parse
from ._integrity import LockEntry, Pin, parse_digest, pin_of, read_lock
from ._store import Accept, Record, Store
from ._types import Handle
from .errors import HubError, IntegrityError

__all__ = ["accept_for", "cached", "pin_for"]


def pin_for(
    parsed: ParsedHandle,
    digest: str | None,
    lock: Mapping[str, LockEntry] | None,
    lockfile: Path | None,
) -> Pin | None:
    """What the handle's download must match: the argument, the fragment, the lock file.

    Digests that disagree are a HandleError (a given digest agrees with the
    lock file's entry when it is either of its digests, see ``pin_of``);
    with a lock file, a handle it does not list is refused (IntegrityError).
    A prefix has no archive: its pin is the module's content digest.
    """
    given: list[tuple[str, str]] = []
    if digest is not None:
        given.append((parse_digest(digest, handle=parsed.text), "digest argument"))
    if parsed.digest is not None:
        given.append((parsed.digest, "#sha256= fragment"))
    entry_pin: Pin | None = None
    if lock is not None:
        assert lockfile is not None
        entry = lock.get(parsed.name)
        if entry is None:
            raise IntegrityError(
                f"{parsed.text} is not in the lock file {lockfile}, and a hub "
                "with a lock file fetches nothing unpinned; add it with "
                f"'asynchub lock {parsed.name} ...'",
                handle=parsed.text,
            )
        entry_pin = entry.pin(lockfile)
    return pin_of(given, entry_pin, prefix=parsed.kind is HandleKind.PREFIX, handle=parsed.text)


def accept_for(pin: Pin | None) -> Accept | None:
    """A store ``accept`` that takes only entries recorded with the pinned digest."""
    if pin is None:
        return None

    def accept(record: Record) -> bool:
        return pin.satisfied_by(record.sha256, record.tree_sha256)

    return accept


def cached(handle: Handle, options: Mapping[str, Any]) -> Path | None:
    """The module directory of ``handle`` if it needs no download, else None.

    ``options`` are a hub's (``cache_dir``, ``lockfile``, ...), read as
    :class:`~asynchub.AsyncHub` reads them; a misspelt or invalid one raises as
    there. A local directory is returned as is; an archive or URL only when its
    cache entry is complete and holds the pinned digest, if one applies. None
    also when a hub must answer: a handle or lock file it would refuse (it
    raises then, with its context), or progress reporting asked for (a hit is
    reported as an event). Blocking: one ``stat`` per file of the entry.
    """
    config_options = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    config = HubConfig.from_env(**config_options)
    if options.get("progress") is not None or config.progress:
        return None
    try:
        parsed = parse(handle, strict=False)
        if parsed.kind is HandleKind.DIRECTORY:
            return parsed.path
        lock = None if config.lockfile is None else read_lock(config.lockfile)
        pin = pin_for(parsed, None, lock, config.lockfile)
    except HubError:
        return None
    store = Store(
        config.cache_dir, stale_after=config.lock_stale_after, lock_timeout=config.lock_timeout
    )
    name = None if pin is None else pin.name
    return store.lookup(parsed.key, parsed.stamp, accept_for(pin), name)
