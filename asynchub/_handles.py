"""Handle parsing and cache keys: pure functions, no I/O beyond a stat.

An http(s), ``s3://`` or ``gs://`` handle's key is tensorflow_hub's: sha1 of
the handle as given, after a ``#sha256=`` fragment (a pinned digest) is
stripped. A local archive's key is sha1 of its absolute path, so the same file
named from two directories is one entry and two files of one name are two; its
size and mtime go with the parsed handle, and an entry extracted from other
bytes is stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ._integrity import split_fragment
from ._types import Handle
from .errors import HandleError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "HandleKind",
    "ParsedHandle",
    "cache_key",
    "compressed_url",
    "kaggle_url",
    "key_of",
    "parse",
    "split_object_url",
]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
FORMAT_PARAM = ("tf-hub-format", "compressed")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FRAGMENT = "#sha256="
# What is left of a handle once its #sha256= is split off: a URL may hold no '#'
# at all; an object key may, unless what follows reads as a fragment's "name=".
_URL_FRAGMENT = re.compile(r"#(.*)$", re.DOTALL)
_OBJECT_FRAGMENT = re.compile(r"#([A-Za-z][A-Za-z0-9_.-]*=.*)$", re.DOTALL)

_FORMS = (
    "a local module directory, a local .tar/.tar.gz/.tgz archive (path or file:// URL), "
    "an http(s):// URL, a kaggle://OWNER/MODEL/FRAMEWORK/VARIATION/VERSION handle, "
    "or an s3:// or gs:// archive object (…/m.tar.gz) or prefix (…/dir/)"
)
#: Where a ``kaggle://`` handle's module is published: Kaggle Models, as tensorflow_hub fetches it.
KAGGLE_MODELS = "https://www.kaggle.com/models/"
_KAGGLE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
OBJECT_SCHEMES = ("s3", "gs")
# S3's and GCS's bucket rules, loosely: lower-case letters, digits, dots, dashes, underscores.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class HandleKind(enum.Enum):
    DIRECTORY = "directory"  #: used in place
    ARCHIVE = "archive"  #: a local archive, extracted into the cache
    URL = "url"  #: fetched over HTTP, extracted into the cache
    OBJECT = "object"  #: an s3:// or gs:// archive object, extracted into the cache
    PREFIX = "prefix"  #: an s3:// or gs:// prefix holding an unpacked module, copied file by file


@dataclass(frozen=True)
class ParsedHandle:
    """A handle understood: what it is, and where its bytes come from."""

    text: str  #: the handle as given
    kind: HandleKind
    path: Path | None = None  #: DIRECTORY and ARCHIVE (absolute for ARCHIVE)
    #: URL: the address with ``tf-hub-format=compressed`` added; OBJECT and PREFIX:
    #: ``s3://bucket/key`` (a PREFIX's ends with "/")
    url: str | None = None
    #: ARCHIVE: (size, mtime_ns) of the file when parsed; an entry from other bytes is stale
    stamp: tuple[int, int] | None = None
    #: the sha256 (hex) pinned by a ``#sha256=`` fragment
    digest: str | None = None
    #: the handle without that fragment (None: the same as ``text``)
    base: str | None = None

    @property
    def name(self) -> str:
        """The handle that names the cache entry: as given, less a ``#sha256=`` fragment.

        A ``kaggle://`` handle's is its Kaggle Models URL, so both forms are one entry.
        """
        return self.text if self.base is None else self.base

    @functools.cached_property
    def key(self) -> str:
        if self.kind is HandleKind.ARCHIVE and self.path is not None:
            return cache_key(os.fspath(self.path))
        return cache_key(self.name)

    @property
    def source(self) -> str:
        """Where the bytes come from, for messages."""
        return self.url if self.url is not None else str(self.path)


def cache_key(handle: str) -> str:
    """The cache entry name: sha1 of the handle as given (tensorflow_hub's rule)."""
    return hashlib.sha1(handle.encode("utf-8")).hexdigest()


def key_of(text: str) -> str:
    """The cache key ``text`` resolves to, also for a local archive that is gone now."""
    try:
        return parse(text).key
    except HandleError:
        pass
    with contextlib.suppress(HandleError):
        text = split_fragment(text)[0]
    if text.lower().startswith("file://"):
        try:
            return cache_key(os.path.abspath(unquote(urlsplit(text).path)))
        except ValueError:
            return cache_key(text)
    if text.lower().endswith(ARCHIVE_SUFFIXES) and not _SCHEME.match(text):
        return cache_key(os.path.abspath(os.path.expanduser(text)))
    return cache_key(text)


def compressed_url(url: str) -> str:
    """``url`` with ``tf-hub-format=compressed`` in its query, other parameters kept."""
    parts = urlsplit(url)
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != FORMAT_PARAM[0]
    ]
    query.append(FORMAT_PARAM)
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse(handle: Handle, *, strict: bool = True) -> ParsedHandle:
    """Classify ``handle``; raise :class:`HandleError` for anything asynchub cannot resolve.

    ``strict=False`` skips one check: whether httpx would send an http(s) URL. A
    cache lookup, which sends nothing, parses so without importing httpx.
    """
    if not isinstance(handle, (str, os.PathLike)):
        raise HandleError(
            f"handle must be a str or a path, got {type(handle).__name__}; expected {_FORMS}",
            handle=repr(handle),
        )
    text = os.fspath(handle)
    if not isinstance(text, str):
        raise HandleError(f"handle must be text, got bytes {text!r}", handle=repr(text))
    if not text.strip():
        raise HandleError(f"empty handle; expected {_FORMS}", handle=text)
    if "\0" in text:
        raise HandleError(f"handle {text!r} contains a NUL character", handle=text)
    if text.lower().count(_FRAGMENT) > 1:
        raise HandleError(
            f"{text}: #sha256= is given twice; a handle takes one digest", handle=text
        )
    if _FRAGMENT in text:
        base, digest = split_fragment(text)
        parsed = _parse(base, strict)
        _check_fragment(parsed, text)
        if parsed.kind is HandleKind.DIRECTORY:
            raise HandleError(
                f"{text}: a digest pins an archive's bytes, but {base} is a directory "
                "(used in place, never fetched)",
                handle=text,
            )
        return dataclasses.replace(parsed, text=text, digest=digest, base=parsed.name)
    parsed = _parse(text, strict)
    _check_fragment(parsed, text)
    return parsed


def _check_fragment(parsed: ParsedHandle, text: str) -> None:
    """Refuse any fragment but ``#sha256=`` on a fetched handle, rather than drop it.

    ``parsed`` is ``text`` less its ``#sha256=`` fragment. An http(s) or file://
    URL's fragment never reaches the server or the file, so ``#size=3`` or
    ``#SHA256=…`` would be ignored in silence (and still change the cache key).
    An object key may hold a '#' (``m#2.tar.gz``); one followed by ``name=``
    reads as a fragment, and is refused too. A local path's '#' is part of the
    file's name.
    """
    if parsed.kind is HandleKind.URL or parsed.text.lower().startswith("file://"):
        pattern = _URL_FRAGMENT
    elif parsed.kind in (HandleKind.OBJECT, HandleKind.PREFIX):
        pattern = _OBJECT_FRAGMENT
    else:
        return
    found = pattern.search(parsed.text.partition("://")[2])
    if found is not None:
        raise HandleError(
            f"{text}: unknown fragment {found.group(1)!r}; the only fragment a handle takes "
            "is #sha256=<64 hex digits> (a URL's fragment never reaches the server)",
            handle=text,
        )


def _parse(text: str, strict: bool = True) -> ParsedHandle:
    lower = text.lower()
    if lower.startswith(("http://", "https://")):
        return ParsedHandle(text, HandleKind.URL, url=_checked_url(text, strict))
    if lower.startswith("kaggle://"):
        url = kaggle_url(text)
        return ParsedHandle(text, HandleKind.URL, url=_checked_url(url, strict), base=url)
    if lower.startswith(("s3://", "gs://")):
        return _object(text)
    if lower.startswith("file://"):
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise HandleError(f"malformed file:// URL {text!r}: {exc}", handle=text) from exc
        if parts.netloc not in ("", "localhost"):
            raise HandleError(
                f"file:// URL {text!r} names a remote host; only local files are supported",
                handle=text,
            )
        path = Path(unquote(parts.path))
        return _local(text, path, must_be_archive=True)
    scheme_match = _SCHEME.match(text)
    if scheme_match and not Path(text).exists():
        scheme = scheme_match.group(1)
        raise HandleError(
            f"unsupported scheme {scheme!r} in handle {text!r}; expected {_FORMS}", handle=text
        )
    return _local(text, Path(text).expanduser(), must_be_archive=False)


def kaggle_url(handle: str) -> str:
    """The Kaggle Models URL of ``kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]``.

    keras_hub's form; the URL is the one tensorflow_hub and a browser use
    (``https://www.kaggle.com/models/google/mobilenet-v2/TensorFlow2/100-224-classification/2``),
    so the handle shares its cache entry, and a lock file's or a mirror's,
    with that URL. Without a version the server picks the latest, once.
    """
    rest = handle.partition("://")[2]
    parts = rest.split("/")
    if rest.endswith("/"):
        parts = parts[:-1]
    expected = "expected kaggle://OWNER/MODEL/FRAMEWORK/VARIATION/VERSION"
    if len(parts) not in (4, 5) or not all(_KAGGLE_SEGMENT.match(p) for p in parts):
        raise HandleError(
            f"{handle!r} is not a Kaggle Models handle; {expected} "
            "(letters, digits, '.', '_', '-' in each part)",
            handle=handle,
        )
    if len(parts) == 5 and not (parts[4].isascii() and parts[4].isdigit()):
        raise HandleError(
            f"{handle!r}: the version {parts[4]!r} is not a number; {expected}", handle=handle
        )
    return KAGGLE_MODELS + "/".join(parts)


def split_object_url(url: str) -> tuple[str, str, str]:
    """``("s3" | "gs", bucket, key)`` of an object-store URL (the key may be "" or end with "/")."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    return scheme.lower(), bucket, key


def _object(text: str) -> ParsedHandle:
    """An ``s3://`` or ``gs://`` handle: an archive object, or a prefix holding a module."""
    scheme, bucket, key = split_object_url(text)
    if not _BUCKET.match(bucket):
        raise HandleError(
            f"{text!r} names no valid bucket ({bucket!r}: 3-222 lower-case letters, digits, "
            f"dots, dashes); expected {scheme}://BUCKET/KEY.tar.gz or {scheme}://BUCKET/PREFIX/",
            handle=text,
        )
    if "//" in key or key.startswith("/") or any(p in (".", "..") for p in key.split("/")):
        raise HandleError(
            f"{text!r}: the object key {key!r} has an empty, '.' or '..' path segment",
            handle=text,
        )
    url = f"{scheme}://{bucket}/{key}"
    if key.lower().endswith(ARCHIVE_SUFFIXES):
        return ParsedHandle(text, HandleKind.OBJECT, url=url)
    # Anything else names a directory-like prefix: "…/dir" and "…/dir/" list the same
    # objects (a listing is by path segment), though they are two handles, two keys.
    if key and not key.endswith("/"):
        url += "/"
    return ParsedHandle(text, HandleKind.PREFIX, url=url)


def _checked_url(text: str, strict: bool = True) -> str:
    """The compressed-format URL of an http(s) handle, or HandleError if it is malformed.

    ``strict`` also asks httpx (imported here, not at module level: a process that
    only looks in the cache never needs it) whether its client would send the URL.
    """
    try:
        parts = urlsplit(text)
        host = parts.hostname
        _ = parts.port  # a port that is not a number raises here
        url = compressed_url(text)
        if strict:
            import httpx

            try:
                httpx.URL(url)  # what the client will refuse (control characters, bad hosts)
            except httpx.InvalidURL as exc:
                raise ValueError(str(exc)) from exc
    except ValueError as exc:
        raise HandleError(f"malformed URL {text!r}: {exc}; expected {_FORMS}", handle=text) from exc
    if not host:
        raise HandleError(f"URL {text!r} names no host; expected {_FORMS}", handle=text)
    return url


def _local(text: str, path: Path, *, must_be_archive: bool) -> ParsedHandle:
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and not must_be_archive:
        return ParsedHandle(text, HandleKind.DIRECTORY, path=path)
    if st is not None and stat.S_ISREG(st.st_mode):
        if path.name.lower().endswith(ARCHIVE_SUFFIXES):
            return ParsedHandle(
                text,
                HandleKind.ARCHIVE,
                path=Path(os.path.abspath(path)),
                stamp=(st.st_size, st.st_mtime_ns),
            )
        raise HandleError(
            f"{path} is a file but not a .tar, .tar.gz or .tgz archive; expected {_FORMS}",
            handle=text,
        )
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise HandleError(f"file:// handle {text!r} names a directory, not an archive", handle=text)
    raise HandleError(f"{path} does not exist; expected {_FORMS}", handle=text)
