"""Configuration values of a hub: small frozen objects, read from the environment once.

A value an option or variable cannot take is a ConfigError that names it, the
value and what is allowed: nothing falls back to a default in silence.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast
from urllib.parse import urlsplit

from ._types import ProgressCallback
from .errors import ConfigError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "GZIP_BACKENDS",
    "MAX_EXTRACT_MEMBERS",
    "RUNTIME_OPTIONS",
    "ConfigError",
    "HubConfig",
    "HubOptions",
    "HubOptionsBase",
    "Retries",
    "Timeouts",
]

ENV_CACHE_DIR = "TFHUB_CACHE_DIR"
ENV_OFFLINE = "ASYNCHUB_OFFLINE"
ENV_PROGRESS = "TFHUB_DOWNLOAD_PROGRESS"
ENV_GZIP = "ASYNCHUB_GZIP"
ENV_MIRRORS = "ASYNCHUB_MIRRORS"
ENV_LOCKFILE = "ASYNCHUB_LOCKFILE"
ENV_FILE_DIGESTS = "ASYNCHUB_FILE_DIGESTS"
ENV_MAX_EXTRACT_MEMBERS = "ASYNCHUB_MAX_EXTRACT_MEMBERS"
ENV_CONNECTIONS = "ASYNCHUB_CONNECTIONS"

MirrorMismatch = Literal["raise", "origin"]

#: The gzip implementations extraction can use, preferred first.
GZIP_BACKENDS = ("isal", "zlib-ng", "zlib")
#: The default bound on an archive's members (files, directories, the root): far
#: more than any SavedModel has, far fewer than a hostile archive of empty ones.
MAX_EXTRACT_MEMBERS = 100_000

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_BOOLEAN = "1/0, true/false, yes/no or on/off (any case)"
_MAX_EXTRACT = 64 * 1024**3
_LOCK_STALE_AFTER = 600.0
_MIRROR_FORMS = (
    "s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], http(s)://HOST[/PATH], "
    "a file:// URL or a local directory"
)
# RFC 9110's token: what a header name may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _refuse(where: str, allowed: str, value: Any) -> ConfigError:
    """The error for ``where`` (an option or a variable) holding ``value``."""
    return ConfigError(f"{where} must be {allowed}, got {value!r}")


def _count(where: str, value: Any, minimum: int) -> int:
    """A whole number >= ``minimum``; True/False and 2.5 are not counts."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise _refuse(where, f">= {minimum} (a whole number)", value)
    return number


def _seconds(where: str, value: Any, *, zero: bool = False) -> float:
    """A finite number of seconds, > 0 (>= 0 with ``zero``)."""
    allowed = f"seconds {'>=' if zero else '>'} 0, a finite number"
    # float() would take "15" too: a config value is a number, not text.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _refuse(where, allowed, value)
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise _refuse(where, allowed, value)
    return number


@dataclass(frozen=True)
class Timeouts:
    """Network timeouts in seconds.

    ``read`` applies between two chunks, not to the whole body: a stream that
    stalls that long is resumed (or retried). ``stalled`` bounds the time spent
    waiting on stalls over one whole download, so a server that keeps stalling
    fails with a NetworkError in bounded time (with the defaults, under a minute)
    while one that stalls once is survived.
    """

    connect: float = 10.0
    read: float = 15.0
    stalled: float = 45.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _seconds(f"Timeouts({f.name}=...)", getattr(self, f.name))

    @classmethod
    def coerce(cls, value: Timeouts | float | None) -> Timeouts:
        """The keyword ``timeout``: a Timeouts, seconds for all three (stalls thrice), or None."""
        if isinstance(value, Timeouts):
            return value
        if value is None:
            return cls()
        seconds = _seconds("timeout", value)
        return cls(connect=seconds, read=seconds, stalled=3 * seconds)


@dataclass(frozen=True)
class Retries:
    """How often and how patiently a download is tried again.

    ``total`` is the number of retries after the first attempt. The wait before
    retry *n* (0-based) is drawn uniformly from ``[0, min(max_backoff, backoff * 2**n)]``
    ("full jitter"), unless the server sent ``Retry-After``, which is honoured up
    to ``max_retry_after`` seconds.
    """

    total: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        _count("Retries(total=...)", self.total, 0)
        for name in ("backoff", "max_backoff", "max_retry_after"):
            _seconds(f"Retries({name}=...)", getattr(self, name), zero=True)

    @classmethod
    def coerce(cls, value: Retries | int | None) -> Retries:
        """The keyword ``retries``: a Retries, a count of retries, or None."""
        if isinstance(value, Retries):
            return value
        if value is None:
            return cls()
        return cls(total=_count("retries", value, 0))


def default_cache_dir() -> Path:
    """``TFHUB_CACHE_DIR`` if set, else ``<system temp>/tfhub_modules`` (tensorflow_hub's rule)."""
    env = os.environ.get(ENV_CACHE_DIR, "")
    if env:
        return Path(env).expanduser()
    return Path(tempfile.gettempdir()) / "tfhub_modules"


def parse_flag(text: str, where: str) -> bool:
    """``text`` as a boolean: 1/0, true/false, yes/no, on/off in any case; empty is False."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _refuse(where, f"{_BOOLEAN}, or empty for off", text)


def env_flag(name: str) -> bool:
    """The boolean variable ``name`` (unset or empty: False); ConfigError if it is neither."""
    return parse_flag(os.environ.get(name, ""), name)


def _opt(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    given: Callable[[Any], Any] | None = None,
    decode: Callable[[Any], Any] | None = None,
    option: str | None = "",
) -> Any:
    """A HubConfig field, with what its option does.

    ``given(value)`` turns the keyword (None when not given) into the field's
    value, reading the environment where the option has a variable; by default
    None means the default. ``decode`` reads the field back from its JSON
    (:meth:`HubConfig.to_json`). ``option`` is the keyword's name when it is not
    the field's; None: the field has no keyword (set from the environment only).
    """
    metadata = {"given": given, "decode": decode, "option": option}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _concurrency(value: int | None) -> int:
    return _default_concurrency() if value is None else _count("max_concurrency", value, 1)


def _mismatch(value: Any) -> MirrorMismatch:
    if value not in (None, "raise", "origin"):
        raise _refuse("on_mirror_mismatch", "'raise' or 'origin'", value)
    return cast(MirrorMismatch, value or "raise")


def _mirrors(value: Sequence[str] | str | None) -> tuple[str, ...]:
    where = "mirrors"
    if value is None:
        where, value = ENV_MIRRORS, os.environ.get(ENV_MIRRORS, "")
    if isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, Sequence) or not all(isinstance(m, str) for m in value):
        raise _refuse(where, "a list of mirrors, or one comma-separated string", value)
    mirrors = tuple(m.strip() for m in value if m.strip())
    for mirror in mirrors:
        _check_mirror(where, mirror)
    return mirrors


def _check_mirror(where: str, mirror: str) -> None:
    """Refuse a mirror that is a URL of an unknown scheme, or one without a host or bucket.

    The same forms as ``_sources.mirrors.normalise`` takes, checked here so the
    message names the option or variable the mirror came from.
    """
    scheme, sep, rest = mirror.partition("://")
    if not sep:
        return  # a local directory
    scheme = scheme.lower()
    if scheme in ("s3", "gs"):
        if not rest.partition("/")[0]:
            raise ConfigError(
                f"{where}: mirror {mirror!r} names no bucket; expected {_MIRROR_FORMS}"
            )
    elif scheme in ("http", "https"):
        try:
            host = urlsplit(mirror).hostname
        except ValueError:
            host = None
        if not host:
            raise ConfigError(f"{where}: mirror {mirror!r} names no host; expected {_MIRROR_FORMS}")
    elif scheme != "file":
        raise ConfigError(f"{where}: mirror {mirror!r} is not one of {_MIRROR_FORMS}")


def _path(where: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise _refuse(where, "a path (str or os.PathLike)", value)
    if "\0" in os.fspath(value):
        raise _refuse(where, "a path without a NUL character", value)
    return Path(value).expanduser()


def _cache_dir(value: str | os.PathLike[str] | None) -> Path:
    if value is None or (isinstance(value, str) and not value):
        return default_cache_dir()
    return _path("cache_dir", value)


def _lockfile(value: str | os.PathLike[str] | None) -> Path | None:
    where = "lockfile"
    if value is None:
        where, value = ENV_LOCKFILE, os.environ.get(ENV_LOCKFILE, "").strip() or None
    elif isinstance(value, (str, os.PathLike)) and not os.fspath(value):
        value = None  # "" turns a lock file in the environment off
    return None if value is None else _path(where, value)


def _flag(env: str, option: str) -> Callable[[Any], bool]:
    """A boolean option: the keyword (a bool, or text read as the variable is), else ``env``."""

    def given(value: Any) -> bool:
        if value is None:
            return env_flag(env)
        if isinstance(value, str):
            return parse_flag(value, option)
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise _refuse(option, f"True or False (or text: {_BOOLEAN})", value)

    return given


def _env_flag(env: str) -> Callable[[None], bool]:
    return lambda _value: env_flag(env)


def _gzip(value: str | None) -> str | None:
    where = "gzip_backend"
    if value is None:
        where, value = ENV_GZIP, os.environ.get(ENV_GZIP, "").strip().lower()
    if value == "":
        return None  # the fastest one installed
    if value not in GZIP_BACKENDS:
        # "unknown gzip backend" are the words the extractor's own check uses.
        choices = ", ".join(repr(name) for name in GZIP_BACKENDS)
        raise ConfigError(
            f"{where}: unknown gzip backend {value!r}; choose from {choices} "
            "(unset or empty: the fastest one installed)"
        )
    return value


def _headers(value: Mapping[str, str] | None) -> dict[str, str]:
    """The origin's headers, checked now: httpx would refuse them only at the first request.

    Messages name a header, never its value (it may be a credential).
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            "headers must be a mapping of header name to value (a dict), "
            f"got a {type(value).__name__}"
        )
    for name, text in value.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ConfigError(
                f"headers: {name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
            )
        if not isinstance(text, str):
            raise ConfigError(
                f"headers: the value of {name!r} must be text, got a {type(text).__name__}"
            )
        if any(c in text for c in "\r\n\0"):
            raise ConfigError(f"headers: the value of {name!r} holds a line break or NUL")
    return dict(value)


def _store_options(option: str) -> Callable[[Mapping[str, Any] | None], dict[str, Any]]:
    """``s3_options``/``gcs_options``: obstore checks the names; the shape is checked here.

    Messages name no value (a secret key may be one).
    """
    allowed = f"{option} must be a mapping of obstore option names (text) to values"

    def given(value: Mapping[str, Any] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{allowed}, got a {type(value).__name__}")
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{allowed}, got the name {name!r}")
        return dict(value)

    return given


def _connections(value: int | str | None) -> int | None:
    """``connections``: a count >= 1, or None/"auto" (decided per archive); else the variable."""
    where: str = "connections"
    if value is None:
        where, value = ENV_CONNECTIONS, os.environ.get(ENV_CONNECTIONS, "").strip()
        if value.isdecimal():
            value = int(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        return _count(where, value, 1)
    except ConfigError:
        raise _refuse(where, ">= 1 (a whole number), or 'auto' (unset: auto)", value) from None


def _max_extract_bytes(value: int | None) -> int:
    return _MAX_EXTRACT if value is None else _count("max_extract_bytes", value, 1)


def _max_extract_members(value: int | None) -> int:
    if value is not None:
        return _count("max_extract_members", value, 1)
    text = os.environ.get(ENV_MAX_EXTRACT_MEMBERS, "").strip()
    if not text:
        return MAX_EXTRACT_MEMBERS
    if not text.isdecimal() or int(text) < 1:
        allowed = f">= 1 (a whole number; unset: {MAX_EXTRACT_MEMBERS})"
        raise _refuse(ENV_MAX_EXTRACT_MEMBERS, allowed, text)
    return int(text)


def _lock_stale_after(value: float | None) -> float:
    return _LOCK_STALE_AFTER if value is None else _seconds("lock_stale_after", value)


def _lock_timeout(value: float | None) -> float | None:
    return None if value is None else _seconds("lock_timeout", value, zero=True)


@dataclass(frozen=True)
class HubConfig:
    """Everything a hub needs to know, fixed when the hub is made.

    **The one list of the hub's options.** Each field says, once, how its
    keyword becomes its value (the environment filling what is not given) and
    how it travels as JSON to worker processes; :meth:`from_env`,
    :meth:`to_json` and :meth:`from_json` work from that, and the typed
    keywords (:class:`HubOptions`) are checked against it by a test.
    """

    #: Where modules are cached: ``TFHUB_CACHE_DIR``, else ``<system temp>/tfhub_modules``.
    cache_dir: Path = _opt(given=_cache_dir, decode=Path)
    #: Network timeouts (keyword ``timeout``: seconds, or a Timeouts).
    timeouts: Timeouts = _opt(
        factory=lambda: Timeouts(),
        given=Timeouts.coerce,
        decode=lambda v: Timeouts(**v),
        option="timeout",
    )
    #: Retries after the first attempt (keyword ``retries``: a count, or a Retries).
    retries: Retries = _opt(
        factory=lambda: Retries(),
        given=Retries.coerce,
        decode=lambda v: Retries(**v),
    )
    #: Headers sent to the handle's origin only (never across a redirect elsewhere).
    headers: Mapping[str, str] = _opt(factory=dict, given=_headers)
    #: Never download: only the cache answers (``ASYNCHUB_OFFLINE``).
    offline: bool = _opt(False, given=_flag(ENV_OFFLINE, "offline"))
    #: Downloads at once, per hub.
    max_concurrency: int = _opt(4, given=_concurrency)
    #: Connections per http(s) archive (``ASYNCHUB_CONNECTIONS``): its byte ranges
    #: fetched at once and extracted in order. None (auto) splits a large archive whose
    #: one stream is slow, by how slow; 1 is one stream.
    connections: int | None = _opt(None, given=_connections)
    #: Refuse archives that would extract to more than this many bytes.
    max_extract_bytes: int = _opt(_MAX_EXTRACT, given=_max_extract_bytes)
    #: Refuse archives of more than this many members, directories included
    #: (``ASYNCHUB_MAX_EXTRACT_MEMBERS``): millions of empty files are a bomb too.
    max_extract_members: int = _opt(MAX_EXTRACT_MEMBERS, given=_max_extract_members)
    #: A lock whose download dir has not grown for this long is taken over.
    lock_stale_after: float = _opt(_LOCK_STALE_AFTER, given=_lock_stale_after)
    #: Give up waiting for another process's download after this long (None: wait
    #: as long as it makes progress).
    lock_timeout: float | None = _opt(None, given=_lock_timeout)
    #: Bytes per chunk handed from the network to the extraction thread.
    chunk_size: int = _opt(1024 * 1024, option=None)
    #: Draw a progress display when no callback is given (``TFHUB_DOWNLOAD_PROGRESS``).
    progress: bool = _opt(False, given=_env_flag(ENV_PROGRESS), option=None)
    #: The gzip implementation extraction uses ("isal", "zlib-ng", "zlib"); None picks
    #: the fastest one installed (``ASYNCHUB_GZIP``).
    gzip_backend: str | None = _opt(None, given=_gzip)
    #: Where http(s) handles are looked for first, as ``<mirror>/<cache key>.tar.gz``
    #: (``ASYNCHUB_MIRRORS``, comma-separated).
    mirrors: tuple[str, ...] = _opt((), given=_mirrors, decode=tuple)
    #: A lock file: every archive must match its pins, and handles it lacks are
    #: refused (``ASYNCHUB_LOCKFILE``; ``""`` turns the variable's off).
    lockfile: Path | None = _opt(None, given=_lockfile, decode=Path)
    #: What a mirror's copy that fails its pin leads to: an IntegrityError ("raise"),
    #: or a download from the origin ("origin").
    on_mirror_mismatch: MirrorMismatch = _opt("raise", given=_mismatch)
    #: Options for ``s3://`` and ``gs://`` stores (obstore's S3Config/GCSConfig and
    #: ClientConfig keys), over the environment.
    s3_options: Mapping[str, Any] = _opt(factory=dict, given=_store_options("s3_options"))
    gcs_options: Mapping[str, Any] = _opt(factory=dict, given=_store_options("gcs_options"))
    #: Record every extracted file's sha256 (``ASYNCHUB_FILE_DIGESTS``).
    file_digests: bool = _opt(False, given=_flag(ENV_FILE_DIGESTS, "file_digests"))

    @classmethod
    def options(cls) -> dict[str, Field[Any]]:
        """The hub's keyword options that are config, by keyword: the fields that have one."""
        found = {}
        for f in fields(cls):
            name = f.metadata.get("option", "")
            if name is not None:
                found[name or f.name] = f
        return found

    @classmethod
    def from_env(cls, **options: Any) -> HubConfig:
        """Build a config from keyword options, the environment filling what is not given."""
        known = cls.options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown hub option(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata.get("option", "")
            value = None if name is None else options.get(name or f.name)
            given = f.metadata.get("given")
            if given is not None:
                values[f.name] = given(value)
            elif value is not None:
                values[f.name] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON values; :meth:`from_json` reads it back equal."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HubConfig:
        values = {}
        for f in fields(cls):
            if f.name in data:
                decode = f.metadata.get("decode")
                value = data[f.name]
                values[f.name] = value if decode is None or value is None else decode(value)
        return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return os.fspath(value)
    if isinstance(value, (Timeouts, Retries)):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _default_concurrency() -> int:
    # Downloads are network- and gunzip-bound; a few more than the cores keeps
    # both busy without flooding a server.
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


class HubOptionsBase(TypedDict, total=False):
    """The hub's options but max_concurrency, which aprefetch's own (a bound per call) shadows."""

    cache_dir: str | os.PathLike[str] | None
    timeout: Timeouts | float | None
    retries: Retries | int | None
    headers: Mapping[str, str] | None
    offline: bool | None
    connections: int | Literal["auto"] | None
    max_extract_bytes: int | None
    max_extract_members: int | None
    lock_stale_after: float | None
    lock_timeout: float | None
    gzip_backend: str | None
    mirrors: Sequence[str] | str | None
    lockfile: str | os.PathLike[str] | None
    on_mirror_mismatch: MirrorMismatch | None
    s3_options: Mapping[str, Any] | None
    gcs_options: Mapping[str, Any] | None
    file_digests: bool | None
    # Objects of the caller's, not config (RUNTIME_OPTIONS): they stay in this process.
    progress: ProgressCallback | None
    transport: httpx.AsyncBaseTransport | None
    keep_alive: bool


class HubOptions(HubOptionsBase, total=False):
    """The keyword options of :class:`AsyncHub`, typed; :class:`Hub` and the helpers pass them on.

    The config's are :meth:`HubConfig.options` (a test keeps the two in step);
    the others are :data:`RUNTIME_OPTIONS`.
    """

    max_concurrency: int | None


#: The hub's options that are objects of the caller's rather than config values:
#: a progress callback, an httpx transport, and whether idle connections are kept.
RUNTIME_OPTIONS = frozenset(HubOptions.__annotations__) - frozenset(HubConfig.options())
