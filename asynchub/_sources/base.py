"""What a source is: where an archive's bytes come from, and nothing about the cache.

A source yields the archive's bytes in order, resuming by itself where its
protocol allows (it counts what it yielded, so a resume starts exactly there),
and says how a failure may be met: :class:`Retry` for a failure another
attempt from the start may fix, any other :class:`HubError` for one it will not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import HubError, Retry

__all__ = ["Retry", "Source", "Transfer"]


@dataclass
class Transfer:
    """One download's progress, shared by the source and the hub's messages and events.

    ``received`` and ``total`` start again with each attempt; ``stalled`` (seconds
    spent waiting on reads or connects that timed out) adds up over the whole
    download, so a server that keeps stalling is given up on in bounded time.
    A download that reads several streams at once (a prefix's objects) shares
    one Transfer, and :meth:`stall` counts their overlapping stalls once.
    """

    received: int = 0
    total: int | None = None
    content_type: str | None = None
    stalled: float = 0.0
    #: The MD5 the server vouched for (``Content-MD5``, ``x-goog-hash``), checked by
    #: the extraction thread over every byte; set before the first byte is yielded.
    md5: bytes | None = None
    #: When the latest stall counted by :meth:`stall` ended (``time.monotonic()``).
    _stall_end: float = field(default=float("-inf"), repr=False, compare=False)

    def stall(self, seconds: float, *, now: float | None = None) -> float:
        """Count a wait of ``seconds`` without a byte that ended ``now``; the total stalled.

        The budget is time the download spent stalled: waits that overlap one
        already counted (objects of one prefix stalling at once) add only what
        lies after it, so eight streams stalled together cost one stall, not eight.
        """
        end = time.monotonic() if now is None else now
        start = max(end - seconds, self._stall_end)
        self.stalled += max(0.0, end - start)
        self._stall_end = max(self._stall_end, end)
        return self.stalled

    def restart(self) -> None:
        self.received = 0
        self.total = None
        self.content_type = None
        self.md5 = None


#: Told when a source resumes by itself: the error that cut the stream.
OnResume = Callable[[HubError], None]


class Source(Protocol):
    """A stream of one archive's bytes."""

    #: Where the bytes come from, for messages (a URL, a path).
    where: str
    #: Whether an archive that ends early may be a cut connection worth a fresh
    #: attempt (a network source), or is simply what the bytes are (a file).
    retry_truncated: bool

    def stream(self, transfer: Transfer, on_resume: OnResume) -> AsyncIterator[bytes]:
        """Yield the archive's bytes from its start, updating ``transfer`` as they go."""
        ...
