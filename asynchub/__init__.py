"""asynchub: load TensorFlow Hub-style modules async-first."""

from __future__ import annotations

import typing as _typing

from ._config import Retries, Timeouts
from ._display import ProgressDisplay
from ._export import export
from ._hub import AsyncHub
from ._module import Module, SignatureInfo, TensorInfo
from ._pack import pack
from ._progress import ProgressEvent, ProgressKind
from ._sync import Hub, aload, aprefetch, aresolve, load, prefetch, resolve
from .errors import (
    ArchiveError,
    CacheError,
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

if _typing.TYPE_CHECKING:
    from ._keras import KerasLayer

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "AsyncHub",
    "CacheError",
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
    # KerasLayer subclasses keras.layers.Layer, so defining it imports Keras and
    # TensorFlow (seconds); that happens on first use, never at `import asynchub`.
    if name == "KerasLayer":
        from ._keras import KerasLayer

        globals()[name] = KerasLayer
        return KerasLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
