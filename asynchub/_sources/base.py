"""What a source is: where an archive's bytes come from, and nothing about the cache.

A source yields the archive's bytes in order, resuming by itself where its
protocol allows (it counts what it yielded, so a resume starts exactly there),
and says how a failure may be met: :class:`Retry` for a failure another
attempt from the start may fix, any other :class:`HubError` for one it will not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import HubError, Retry

__all__ = ["RangedSource", "RangesRefused", "Retry", "Source", "Split", "Transfer", "Validators"]


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


@dataclass(frozen=True)
class Validators:
    """What identifies the bytes of a first (200) response, to check a resume against."""

    etag: str | None = None  #: a strong ETag
    last_modified: str | None = None
    total: int | None = None  #: Content-Length
    ranges: bool = False  #: Accept-Ranges: bytes

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Validators:
        etag = headers.get("etag")
        length = headers.get("content-length")
        return cls(
            etag=etag if etag and not etag.startswith("W/") else None,
            last_modified=headers.get("last-modified"),
            total=int(length) if length and length.isdigit() else None,
            ranges=headers.get("accept-ranges", "").strip().lower() == "bytes",
        )

    @property
    def if_range(self) -> str | None:
        return self.etag or self.last_modified

    @property
    def resumable(self) -> bool:
        """A cut body may be resumed only if a resume can be proved to be the same bytes."""
        return self.ranges and self.if_range is not None and self.total is not None


class RangesRefused(Retry):
    """A store that answered a range with the whole archive: fetch it as one stream."""


@dataclass
class Split:
    """Where a stream from the first byte stops, so that ranges fetch the rest.

    The stream sets ``first`` at the first answer (what identifies the bytes:
    validator, length) and calls ``on_first`` with it, before its first byte;
    whoever splits sets ``end`` (then, or later between two pieces), never
    before the bytes the stream has yielded.
    """

    on_first: Callable[[Validators], None]
    first: Validators | None = None
    end: int | None = None


class RangedSource(Source, Protocol):
    """A source that can also fetch byte ranges of the archive its first answer described."""

    url: str

    def stream(
        self, transfer: Transfer, on_resume: OnResume, split: Split | None = None
    ) -> AsyncIterator[bytes]:
        """:meth:`Source.stream`, stopping at ``split.end`` once it is set."""
        ...

    def fetch_range(
        self, start: int, end: int, first: Validators, transfer: Transfer, on_resume: OnResume
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the archive ``first`` described; a cut resumed alone.

        Another version is a :class:`Retry` of the whole download, a store that
        ignores ranges a :class:`RangesRefused`: two versions are never spliced.
        """
        ...
