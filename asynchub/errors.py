"""Every error asynchub raises on purpose derives from :class:`HubError`.

::

    HubError
    ├── ConfigError             an option or environment variable has a value asynchub cannot use
    │                           (also a ValueError)
    ├── HandleError             the handle is not a form asynchub understands, or does not exist
    ├── DownloadError           fetching the archive failed
    │   ├── HTTPStatusError     the server answered 4xx, or 5xx/429 after every retry
    │   └── NetworkError        connect/read failures and timeouts, after every retry
    ├── ArchiveError            the bytes are not a usable tar archive (corrupt, HTML page, ...)
    │   ├── UnsafeArchiveError  a member would escape the module dir, is a link/device/fifo,
    │   │                       clashes with another member, or the archive is too large
    │   └── TruncatedArchiveError  the bytes end before the archive does (a cut stream)
    ├── IntegrityError          the bytes are not the ones pinned (digest argument, #sha256=
    │                           fragment, lock file) or a server checksum disagrees
    ├── CacheError              the cache dir cannot be used
    │   ├── OfflineError        offline mode and the handle is not in the cache
    │   └── LockTimeoutError    another process held the download lock for too long
    ├── ModuleError             the directory is not a loadable SavedModel
    ├── SignatureError          unknown signature, missing inputs, ambiguous outputs
    ├── QueueFullError          a micro-batcher already held max_queue waiting rows (overload)
    ├── MissingDependencyError  an optional dependency (e.g. TensorFlow) is not installed
    └── PrefetchError           some handles of a prefetch failed (also an ExceptionGroup)

    HubClosedError (RuntimeError)   misuse: the hub was used after it was closed

Errors from httpx, tarfile and TensorFlow are wrapped at the boundary with
``raise ... from exc``; the original stays available as ``__cause__``.

Three more live here and never reach a user: ``Retry`` (a source's word that a
fresh attempt may fix what failed; it carries the HubError raised if none is
left), ``StreamAborted`` (one side of a pipeline stopping because the other
did) and ``ProtocolError`` (a request ``serve --infer`` answers with a status).
A task group's errors are unwrapped in one way, :func:`leaves` (and
:func:`raise_first`, which ranks them so that a cancellation is never lost).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

__all__ = [
    "ArchiveError",
    "CacheError",
    "ConfigError",
    "DownloadError",
    "HTTPStatusError",
    "HandleError",
    "HubClosedError",
    "HubError",
    "IntegrityError",
    "LockTimeoutError",
    "MissingDependencyError",
    "ModuleError",
    "NetworkError",
    "OfflineError",
    "PrefetchError",
    "QueueFullError",
    "SignatureError",
    "TruncatedArchiveError",
    "UnsafeArchiveError",
]


class HubError(Exception):
    """Base class of every error asynchub raises on purpose.

    ``handle`` is the handle the operation was about (``None`` where none applies).
    """

    def __init__(self, message: str, *, handle: str | None = None) -> None:
        super().__init__(message)
        self.handle = handle


class ConfigError(HubError, ValueError):
    """An option or environment variable has a value asynchub cannot use.

    The message names the option or variable, the value, and what is allowed;
    nothing falls back to a default in silence.
    """


class HandleError(HubError, ValueError):
    """The handle is not a local dir, a local archive, an http(s) URL or an s3:// / gs:// object."""


class DownloadError(HubError):
    """Fetching the module's archive failed."""

    def __init__(self, message: str, *, handle: str | None = None, url: str | None = None) -> None:
        super().__init__(message, handle=handle)
        self.url = url


class HTTPStatusError(DownloadError):
    """The server answered with an error status."""

    def __init__(
        self, message: str, *, handle: str | None = None, url: str | None = None, status: int
    ) -> None:
        super().__init__(message, handle=handle, url=url)
        self.status = status


class NetworkError(DownloadError):
    """The connection failed, timed out, or was cut, on every attempt."""


class ArchiveError(HubError):
    """The downloaded or local bytes are not a usable tar archive."""


class UnsafeArchiveError(ArchiveError):
    """A member of the archive was refused before anything of it was written."""


class TruncatedArchiveError(ArchiveError):
    """The bytes end before the archive does: a cut stream, or a cut file.

    A download that ends this way is retried from the start, since a body
    without a length cannot tell a cut connection from its end.
    """


class IntegrityError(HubError):
    """The fetched bytes are not the ones pinned, or not the ones the server vouched for.

    Nothing is committed. Raised for a pinned digest (``digest=``, a
    ``#sha256=`` fragment, a lock file) that the archive or the module's content
    does not match, for a handle a lock file does not list, and for a download
    whose ``Content-MD5``/``x-goog-hash`` checksum disagrees after every retry.
    """


class CacheError(HubError):
    """The cache dir cannot be used as asked."""


class OfflineError(CacheError):
    """Offline mode is on and the handle is not in the cache."""


class LockTimeoutError(CacheError):
    """Another process kept the download lock longer than the hub waits."""


class ModuleError(HubError):
    """The directory is not a loadable SavedModel."""


class SignatureError(HubError, KeyError):
    """A signature or one of its inputs/outputs is unknown or missing."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class QueueFullError(HubError):
    """A batcher already held ``max_queue`` waiting rows: the request was refused at once.

    Overload, not bad input: a server answers it with 503 and Retry-After.
    """


class MissingDependencyError(HubError, ImportError):
    """An optional dependency is missing; the message says what to install."""


class PrefetchError(HubError, ExceptionGroup[Exception]):
    """Some handles of a prefetch failed; ``exceptions`` holds one error per failed handle."""

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> PrefetchError:
        return ExceptionGroup.__new__(cls, message, list(exceptions))

    def __init__(self, message: str, exceptions: Sequence[Exception]) -> None:
        ExceptionGroup.__init__(self, message, list(exceptions))
        self.handle = None

    def derive(self, excs: Sequence[Exception]) -> PrefetchError:  # type: ignore[override]
        return PrefetchError(self.message, excs)


class HubClosedError(RuntimeError):
    """The hub was used after it was closed (misuse, not a HubError)."""


# -- never raised to a user ------------------------------------------------------------------


class Retry(Exception):
    """An attempt failed in a way a fresh attempt may fix; ``error`` is raised if none is left."""

    def __init__(self, error: HubError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class ProtocolError(Exception):
    """A request the inference protocol answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def leaves(exc: BaseException, *, cancelled: bool = True) -> list[BaseException]:
    """Every exception in a (nested) exception group, in order; a lone one is its own leaf.

    ``cancelled=False`` leaves out the event loop's cancellations (call it on
    the loop then): when one task of a group fails, the group cancels the
    others, so their cancellations say nothing about what went wrong.
    """
    if isinstance(exc, BaseExceptionGroup):
        found = [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    else:
        found = [exc]
    if not cancelled:
        import anyio

        kind = anyio.get_cancelled_exc_class()
        found = [leaf for leaf in found if not isinstance(leaf, kind)]
    return found


class StreamAborted(Exception):
    """One side of a pipeline stopped because the other did: an artefact, never an answer.

    The extraction thread raises it when the network task left the stream
    without reaching the end of the body (it failed, or was cancelled): the
    bytes that did arrive are not an archive that ends there.
    """


def _artefact(exc: BaseException) -> bool:
    """A pipeline artefact: one side of a stream noticing that the other side stopped."""
    import anyio

    return isinstance(
        exc,
        (StreamAborted, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream),
    )


def cancel_pending() -> bool:
    """The calling asyncio task has a cancellation that nobody has taken back.

    asyncio delivers ``task.cancel()`` once (Ctrl-C under ``asyncio.run``,
    ``asyncio.timeout``, ``wait_for``, a failing ``TaskGroup`` sibling): once it
    has been raised into a child's code, only the count says it is still
    wanted. False off asyncio (trio's and anyio's scopes cancel again at the
    next checkpoint) and before Python 3.11 (no count).
    """
    if "asyncio" not in sys.modules:
        return False
    import asyncio

    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread
        return False
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


async def raise_first(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise, unwrapped, the error of a task group that says what happened.

    Ranked, so the answer does not depend on which side noticed first: a
    cancellation of the calling task wins (asyncio's one-shot cancel, still
    pending, would not be delivered again; a cancel scope's is raised afresh
    here, as the scope expects it); then real errors, in order; then the
    group's own cancellations; pipeline artefacts (:class:`StreamAborted`, a
    closed or broken stream) last. A group of artefacts alone means its host
    was cancelled and the task group dropped that cancellation in favour of
    its children's errors (anyio's does, on asyncio): it is raised again.
    """
    import anyio

    kind = anyio.get_cancelled_exc_class()
    found = leaves(group)
    cancels = [e for e in found if isinstance(e, kind)]
    real = [e for e in found if not isinstance(e, kind) and not _artefact(e)]
    # An enclosing cancel scope (anyio's, trio's) that was cancelled raises here.
    await anyio.lowlevel.checkpoint_if_cancelled()
    if cancel_pending() or (not real and _on_asyncio(kind)):
        raise cancels[0] if cancels else kind()
    if real:
        raise real[0]
    if cancels:
        raise cancels[0]
    raise found[0]


def _on_asyncio(kind: type[BaseException]) -> bool:
    return "asyncio" in sys.modules and kind is sys.modules["asyncio"].CancelledError
