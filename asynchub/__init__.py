"""asynchub: load TensorFlow Hub-style modules async-first."""

from __future__ import annotations

import typing as _typing

from ._version import __version__
from .errors import (
    ArchiveError,
    CacheError,
    ConfigError,
    DownloadError,
    HandleError,
    HTTPStatusError,
    HubClosedError,
    HubError,
    IntegrityError,
    LockTimeoutError,
    MissingDependencyError,
    ModuleError,
    NetworkError,
    OfflineError,
    PrefetchError,
    QueueFullError,
    SignatureError,
    TruncatedArchiveError,
    UnsafeArchiveError,
)

# Names are imported on first use (PEP 562), so `import asynchub` and the
# modules of its worker processes and command line pay only for what they use:
# the hub's imports (httpx, anyio) are most of the time a short command takes.
_WHERE = {
    "Retries": "._config",
    "Timeouts": "._config",
    "ProgressDisplay": "._display",
    "export": "._export",
    "AsyncHub": "._hub",
    "KerasLayer": "._keras",  # imports Keras and TensorFlow: seconds
    "Module": "._module",
    "SignatureInfo": "._module",
    "TensorInfo": "._module",
    "pack": "._pack",
    "ProgressEvent": "._progress",
    "ProgressKind": "._progress",
    **dict.fromkeys(
        ("Hub", "aload", "aprefetch", "aresolve", "load", "prefetch", "resolve"), "._sync"
    ),
}

if _typing.TYPE_CHECKING:
    from ._config import Retries, Timeouts
    from ._display import ProgressDisplay
    from ._export import export
    from ._hub import AsyncHub
    from ._keras import KerasLayer
    from ._module import Module, SignatureInfo, TensorInfo
    from ._pack import pack
    from ._progress import ProgressEvent, ProgressKind
    from ._sync import Hub, aload, aprefetch, aresolve, load, prefetch, resolve


__all__ = [
    "ArchiveError",
    "AsyncHub",
    "CacheError",
    "ConfigError",
    "DownloadError",
    "HTTPStatusError",
    "HandleError",
    "Hub",
    "HubClosedError",
    "HubError",
    "IntegrityError",
    "KerasLayer",
    "LockTimeoutError",
    "MissingDependencyError",
    "Module",
    "ModuleError",
    "NetworkError",
    "OfflineError",
    "PrefetchError",
    "ProgressDisplay",
    "ProgressEvent",
    "ProgressKind",
    "QueueFullError",
    "Retries",
    "SignatureError",
    "SignatureInfo",
    "TensorInfo",
    "Timeouts",
    "TruncatedArchiveError",
    "UnsafeArchiveError",
    "__version__",
    "aload",
    "aprefetch",
    "aresolve",
    "export",
    "load",
    "pack",
    "prefetch",
    "resolve",
]


def __getattr__(name: str) -> _typing.Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
