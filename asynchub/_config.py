"""Configuration values of a hub: small frozen objects, read from the environment once."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["HubConfig", "Retries", "Timeouts"]

ENV_CACHE_DIR = "TFHUB_CACHE_DIR"
ENV_OFFLINE = "ASYNCHUB_OFFLINE"
ENV_PROGRESS = "TFHUB_DOWNLOAD_PROGRESS"
ENV_GZIP = "ASYNCHUB_GZIP"
ENV_MIRRORS = "ASYNCHUB_MIRRORS"
ENV_LOCKFILE = "ASYNCHUB_LOCKFILE"
ENV_FILE_DIGESTS = "ASYNCHUB_FILE_DIGESTS"

MirrorMismatch = Literal["raise", "origin"]

_TRUE = {"1", "true", "yes", "on"}


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


@dataclass(frozen=True)
class HubConfig:
    """Everything a hub needs to know, fixed when the hub is made."""

    cache_dir: Path
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: Retries = field(default_factory=Retries)
    headers: Mapping[str, str] = field(default_factory=dict)
    offline: bool = False
    max_concurrency: int = 4
    #: Refuse archives that would extract to more than this many bytes.
    max_extract_bytes: int = 64 * 1024**3
    #: A lock whose download dir has not grown for this long is taken over.
    lock_stale_after: float = 600.0
    #: Give up waiting for another process's download after this long (None: wait
    #: as long as it makes progress).
    lock_timeout: float | None = None
    #: Bytes per chunk handed from the network to the extraction thread.
    chunk_size: int = 1024 * 1024
    progress: bool = False
    #: The gzip implementation extraction uses ("isal", "zlib-ng", "zlib"); None picks
    #: the fastest one installed.
    gzip_backend: str | None = None
    #: Where http(s) handles are looked for first, as ``<mirror>/<cache key>.tar.gz``.
    mirrors: tuple[str, ...] = ()
    #: A lock file: every archive must match its pins, and handles it lacks are refused.
    lockfile: Path | None = None
    #: What a mirror's copy that fails its pin leads to: an IntegrityError ("raise"),
    #: or a download from the origin ("origin").
    on_mirror_mismatch: MirrorMismatch = "raise"
    #: Options for ``s3://`` and ``gs://`` stores (obstore's S3Config/GCSConfig and
    #: ClientConfig keys), over the environment.
    s3_options: Mapping[str, Any] = field(default_factory=dict)
    gcs_options: Mapping[str, Any] = field(default_factory=dict)
    #: Record every extracted file's sha256 (``asynchub cache verify --digests``).
    file_digests: bool = False

    @classmethod
    def from_env(
        cls,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: Timeouts | float | None = None,
        retries: Retries | int | None = None,
        headers: Mapping[str, str] | None = None,
        offline: bool | None = None,
        max_concurrency: int | None = None,
        max_extract_bytes: int | None = None,
        lock_stale_after: float | None = None,
        lock_timeout: float | None = None,
        progress: bool | None = None,
        gzip_backend: str | None = None,
        mirrors: Sequence[str] | str | None = None,
        lockfile: str | os.PathLike[str] | None = None,
        on_mirror_mismatch: MirrorMismatch | None = None,
        s3_options: Mapping[str, Any] | None = None,
        gcs_options: Mapping[str, Any] | None = None,
        file_digests: bool | None = None,
    ) -> HubConfig:
        """Build a config from keyword arguments, the environment filling what is not given."""
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if on_mirror_mismatch not in (None, "raise", "origin"):
            raise ValueError(
                f"on_mirror_mismatch must be 'raise' or 'origin', got {on_mirror_mismatch!r}"
            )
        if mirrors is None:
            mirrors = os.environ.get(ENV_MIRRORS, "")
        if isinstance(mirrors, str):
            mirrors = mirrors.split(",")
        if lockfile is None:
            lockfile = os.environ.get(ENV_LOCKFILE, "").strip() or None
        elif not os.fspath(lockfile):
            lockfile = None  # "" turns a lock file in the environment off
        defaults = cls(cache_dir=Path())
        return cls(
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
            timeouts=Timeouts.coerce(timeout),
            retries=Retries.coerce(retries),
            headers=dict(headers or {}),
            offline=env_flag(ENV_OFFLINE) if offline is None else offline,
            max_concurrency=max_concurrency or _default_concurrency(),
            max_extract_bytes=max_extract_bytes or defaults.max_extract_bytes,
            lock_stale_after=(
                defaults.lock_stale_after if lock_stale_after is None else lock_stale_after
            ),
            lock_timeout=lock_timeout,
            progress=env_flag(ENV_PROGRESS) if progress is None else progress,
            gzip_backend=gzip_backend or os.environ.get(ENV_GZIP, "").strip().lower() or None,
            mirrors=tuple(m.strip() for m in mirrors if m.strip()),
            lockfile=None if lockfile is None else Path(lockfile).expanduser(),
            on_mirror_mismatch=on_mirror_mismatch or "raise",
            s3_options=dict(s3_options or {}),
            gcs_options=dict(gcs_options or {}),
            file_digests=env_flag(ENV_FILE_DIGESTS) if file_digests is None else file_digests,
        )


def _default_concurrency() -> int:
    # Downloads are network- and gunzip-bound; a few more than the cores keeps
    # both busy without flooding a server.
    return max(4, min(16, 2 * (os.cpu_count() or 2)))
