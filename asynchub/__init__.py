"""asynchub: load TensorFlow Hub-style modules async-first."""

from __future__ import annotations

from ._config import Retries, Timeouts
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
    LockTimeoutError,
    MissingDependencyError,
    ModuleError,
    NetworkError,
    OfflineError,
    PrefetchError,
    SignatureError,
    UnsafeArchiveError,
)

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
    "LockTimeoutError",
    "MissingDependencyError",
    "Module",
    "ModuleError",
    "NetworkError",
    "OfflineError",
    "PrefetchError",
    "ProgressEvent",
    "ProgressKind",
    "Retries",
    "SignatureError",
    "SignatureInfo",
    "TensorInfo",
    "Timeouts",
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
