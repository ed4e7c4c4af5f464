"""Mirrors: where an http(s) handle's archive is looked for before its origin.

A mirror is a base location: ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]``,
``http(s)://host[/path]``, or a local directory (a path or ``file://`` URL,
e.g. on a shared file system). The archive of the handle whose cache key is
``K`` lies at ``<mirror>/K.tar.gz``: the key is tensorflow_hub's (sha1 of the
handle), so the name says nothing about the module and needs no index.
``asynchub mirror push`` writes those archives with :func:`asynchub.pack`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from anyio import to_thread

from .._handles import split_object_url
from ..errors import HandleError, HubError
from .objstore import ObjectStores, classify, import_obstore, put_file

__all__ = ["archive_location", "kind_of", "normalise", "push"]


def kind_of(mirror: str) -> str:
    """``"s3"``, ``"gs"``, ``"http"`` or ``"dir"``."""
    lower = mirror.lower()
    if lower.startswith(("s3://", "gs://")):
        return lower[:2]
    if lower.startswith(("http://", "https://")):
        return "http"
    return "dir"


def normalise(mirror: str) -> str:
    """A mirror as the hub keeps it (no trailing slash; a local dir made absolute)."""
    text = mirror.strip()
    kind = kind_of(text)
    if kind in ("s3", "gs"):
        _, bucket, _ = split_object_url(text)
        if not bucket:
            raise HandleError(f"mirror {mirror!r} names no bucket", handle=mirror)
        return text.rstrip("/")
    if kind == "http":
        parts = urlsplit(text)
        if not parts.hostname:
            raise HandleError(f"mirror {mirror!r} names no host", handle=mirror)
        return text.rstrip("/")
    if text.lower().startswith("file://"):
        text = unquote(urlsplit(text).path)
    elif "://" in text:
        raise HandleError(
            f"mirror {mirror!r}: expected s3://, gs://, http(s):// or a local directory",
            handle=mirror,
        )
    return os.path.abspath(os.path.expanduser(text))


def archive_location(mirror: str, key: str) -> str:
    """Where the mirror keeps the archive of cache key ``key``."""
    if kind_of(mirror) == "dir":
        return os.path.join(mirror, f"{key}.tar.gz")
    return f"{mirror}/{key}.tar.gz"


async def push(mirror: str, module_dir: Path, key: str, stores: ObjectStores) -> str:
    """Pack ``module_dir`` reproducibly and put it at the mirror as ``<key>.tar.gz``; its location.

    A local mirror gets the archive atomically (``pack`` writes beside it and
    renames); an object store gets it by one put (multipart when large).
    """
    from .._pack import pack  # only here: resolving through a mirror needs no packer

    mirror = normalise(mirror)
    kind = kind_of(mirror)
    where = archive_location(mirror, key)
    if kind == "http":
        raise HubError(
            f"cannot push to {mirror}: an http(s) mirror is read-only here; push to the "
            "bucket or directory behind it",
            handle=mirror,
        )
    if kind == "dir":
        await to_thread.run_sync(pack, module_dir, where)
        return where
    with tempfile.TemporaryDirectory(prefix="asynchub-push-") as tmp:
        archive = Path(tmp) / f"{key}.tar.gz"
        await to_thread.run_sync(pack, module_dir, archive)
        scheme, bucket, path = split_object_url(where)
        store = stores.get(scheme, bucket)
        try:
            await put_file(store, path, archive)
        except (import_obstore().exceptions.BaseError, OSError, ValueError) as exc:
            raise classify(exc, handle=where, url=where, received=0).error from exc
    return where
