"""Configuration values of a hub: small frozen objects, read from the environment once."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from ._types import ProgressCallback

if TYPE_CHECKING:
    import httpx

__all__ = ["RUNTIME_OPTIONS", "HubConfig", "HubOptions", "HubOptionsBase", "Retries", "Timeouts"]

ENV_CACHE_DIR = "TFHUB_CACHE_DIR"
ENV_OFFLINE = "ASYNCHUB_OFFLINE"
ENV_PROGRESS = "TFHUB_DOWNLOAD_PROGRESS"
ENV_GZIP = "ASYNCHUB_GZIP"
ENV_MIRRORS = "ASYNCHUB_MIRRORS"
ENV_LOCKFILE = "ASYNCHUB_LOCKFILE"
ENV_FILE_DIGESTS = "ASYNCHUB_FILE_DIGESTS"

MirrorMismatch = Literal["raise", "origin"]

_TRUE = {"1", "true", "yes", "on"}
_MAX_EXTRACT = 64 * 1024**3


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

    @classmethod
    def coerce(cls, value: Timeouts | float | None) -> Timeouts:
        if isinstance(value, Timeouts):
            return value
        if value is None:
            return cls()
        return cls(connect=float(value), read=float(value), stalled=3 * float(value))


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

    @classmethod
    def coerce(cls, value: Retries | int | None) -> Retries:
        if isinstance(value, Retries):
            return value
        if value is None:
            return cls()
        if value < 0:
            raise ValueError(f"retries must be >= 0, got {value}")
        return cls(total=int(value))


def default_cache_dir() -> Path:
    """``TFHUB_CACHE_DIR`` if set, else ``<system temp>/tfhub_modules`` (tensorflow_hub's rule)."""
    env = os.environ.get(ENV_CACHE_DIR, "")
    if env:
        return Path(env).expanduser()
    return Path(tempfile.gettempdir()) / "tfhub_modules"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


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
    if value is not None and value < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {value}")
    return value or _default_concurrency()


def _mismatch(value: Any) -> MirrorMismatch:
    if value not in (None, "raise", "origin"):
        raise ValueError(f"on_mirror_mismatch must be 'raise' or 'origin', got {value!r}")
    return cast(MirrorMismatch, value or "raise")


def _mirrors(value: Sequence[str] | str | None) -> tuple[str, ...]:
    if value is None:
        value = os.environ.get(ENV_MIRRORS, "")
    if isinstance(value, str):
        value = value.split(",")
    return tuple(m.strip() for m in value if m.strip())


def _lockfile(value: str | os.PathLike[str] | None) -> Path | None:
    if value is None:
        value = os.environ.get(ENV_LOCKFILE, "").strip() or None
    elif not os.fspath(value):
        value = None  # "" turns a lock file in the environment off
    return None if value is None else Path(value).expanduser()


def _flag(env: str) -> Callable[[bool | None], bool]:
    return lambda value: env_flag(env) if value is None else bool(value)


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
    cache_dir: Path = _opt(
        given=lambda v: Path(v).expanduser() if v else default_cache_dir(), decode=Path
    )
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
    headers: Mapping[str, str] = _opt(factory=dict, given=lambda v: dict(v or {}))
    #: Never download: only the cache answers (``ASYNCHUB_OFFLINE``).
    offline: bool = _opt(False, given=_flag(ENV_OFFLINE))
    #: Downloads at once, per hub.
    max_concurrency: int = _opt(4, given=_concurrency)
    #: Refuse archives that would extract to more than this many bytes.
    max_extract_bytes: int = _opt(_MAX_EXTRACT, given=lambda v: v or _MAX_EXTRACT)
    #: A lock whose download dir has not grown for this long is taken over.
    lock_stale_after: float = _opt(600.0)
    #: Give up waiting for another process's download after this long (None: wait
    #: as long as it makes progress).
    lock_timeout: float | None = _opt(None)
    #: Bytes per chunk handed from the network to the extraction thread.
    chunk_size: int = _opt(1024 * 1024, option=None)
    #: Draw a progress display when no callback is given (``TFHUB_DOWNLOAD_PROGRESS``).
    progress: bool = _opt(False, given=_flag(ENV_PROGRESS), option=None)
    #: The gzip implementation extraction uses ("isal", "zlib-ng", "zlib"); None picks
    #: the fastest one installed (``ASYNCHUB_GZIP``).
    gzip_backend: str | None = _opt(
        None, given=lambda v: v or os.environ.get(ENV_GZIP, "").strip().lower() or None
    )
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
    s3_options: Mapping[str, Any] = _opt(factory=dict, given=lambda v: dict(v or {}))
    gcs_options: Mapping[str, Any] = _opt(factory=dict, given=lambda v: dict(v or {}))
    #: Record every extracted file's sha256 (``ASYNCHUB_FILE_DIGESTS``).
    file_digests: bool = _opt(False, given=_flag(ENV_FILE_DIGESTS))

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
    max_extract_bytes: int | None
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
