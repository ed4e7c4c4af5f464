"""One archive over several connections: byte ranges fetched at once, handed on in order.

Real origins cap each connection and answer each request a round trip
later; loopback does neither. So an archive whose first answer proves what
its bytes are (``Accept-Ranges: bytes``, a strong validator, a length) may be
fetched as ranges: the first stream keeps the archive's start, workers fetch
the rest piece by piece (``fetch_range`` of an http(s) or object-store
source: each range checked against the first answer, a cut range resumed
alone), and :class:`RangedFetch`
hands the bytes to the one extraction thread **in order**. Pieces that arrive
early wait in memory up to :data:`MEMORY`, then in an unnamed file inside the
entry's download dir; workers stay within :data:`AHEAD` of the extractor.

With ``connections=None`` (the default) the first stream decides: an archive
of at least :data:`AUTO_MIN_BYTES` whose one stream brings less than
:data:`AUTO_TARGET` is split over as many connections as that rate says
(:func:`auto_connections`), at most :data:`AUTO_MAX`; the rate is measured
over its first MiB after the answer, so the request's round trip does not
count. A stream the extractor cannot keep up with is fast enough already:
nothing changes for it.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import anyio
from anyio import to_thread

from .._sources import RangedSource, Split, Transfer
from .._sources.base import OnResume
from .._sources.http import Validators, origin
from ..errors import raise_first

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "AHEAD",
    "AUTO_MAX",
    "AUTO_MIN_BYTES",
    "AUTO_TARGET",
    "HOST_CONNECTIONS",
    "MEMORY",
    "HostSlots",
    "RangedFetch",
    "auto_connections",
    "pieces",
]

MiB = 1024 * 1024
#: Early pieces wait in memory up to this many bytes, then in a file.
MEMORY = 48 * MiB
#: Workers fetch no piece that starts further than this past the extractor.
AHEAD = 128 * MiB
#: Automatic: archives smaller than this are one stream whatever its speed.
AUTO_MIN_BYTES = 32 * MiB
#: Automatic: the rate (bytes/s) worth reaching; a stream slower than this is split.
AUTO_TARGET = 200 * 1000 * 1000
#: Automatic: at most this many connections per archive.
AUTO_MAX = 8
#: Ranged requests at once to one host, over all downloads of a hub (more with a
#: larger ``connections=``): prefetching many archives opens no hundreds of connections.
HOST_CONNECTIONS = 16
#: Pieces start at FIRST_PIECE and grow GROW times a piece, between MIN_PIECE and
#: MAX_PIECE (:func:`pieces`).
FIRST_PIECE = 2 * MiB
GROW = 1.1
MIN_PIECE = 4 * MiB
MAX_PIECE = 32 * MiB
#: What the first stream measures, from its first answer on, before the automatic choice.
_PROBE_BYTES = 1 * MiB
#: Bytes of the piece being extracted held in memory before its worker waits.
_HEAD_BACKLOG = 4 * MiB

Deliver = Callable[[bytes], Awaitable[bool]]
Slot = Callable[[], AbstractAsyncContextManager[object]]


def auto_connections(rate: float, remaining: int) -> int:
    """How many connections the automatic choice uses, one stream having brought ``rate`` B/s.

    Enough streams at that rate to reach :data:`AUTO_TARGET`, at most
    :data:`AUTO_MAX`, and none for less than two pieces' worth of bytes; 1
    means one stream (fast enough already, or too little left to pay).
    """
    if remaining < AUTO_MIN_BYTES or rate <= 0:
        return 1
    wanted = math.ceil(AUTO_TARGET / rate)
    return max(1, min(AUTO_MAX, wanted, remaining // MIN_PIECE))


def pieces(start: int, total: int, connections: int) -> list[tuple[int, int]]:
    """``[start, total)`` cut into pieces for ``connections`` workers: ``(first byte, end)``.

    The extractor takes the pieces in order, so the first ones are small
    (:data:`FIRST_PIECE`: it is fed within a round trip, not after a whole
    large piece at one connection's rate), each next one :data:`GROW` times
    larger (a request costs a round trip), and none larger than the rest
    shared out twice over the connections (nor smaller than :data:`MIN_PIECE`),
    so they all end together and little waits for the extractor at the end;
    aligned to 64 KiB. Chosen with a simulation of 8 connections of 25 MB/s,
    30 and 100 ms a request, an extractor of 150 to 400 MB/s.
    """
    out = []
    at, size = start, float(FIRST_PIECE)
    n = max(1, connections)
    while at < total:
        share = -(-(total - at) // (2 * n))
        piece = int(min(size, MAX_PIECE, max(MIN_PIECE, share)))
        piece = -(-piece // 65536) * 65536
        out.append((at, min(at + piece, total)))
        at += piece
        size *= GROW
    return out


class HostSlots:
    """A hub's bound on ranged requests at once per origin (scheme, host, port)."""

    def __init__(self, connections: int | None) -> None:
        #: :data:`HOST_CONNECTIONS`, or ``connections`` if more are asked for one archive.
        self.per_host = max(HOST_CONNECTIONS, connections or 0)
        self._limiters: dict[tuple[str, str, int | None], anyio.CapacityLimiter] = {}

    def slot(self, url: str) -> Slot:
        key = origin(url)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = anyio.CapacityLimiter(self.per_host)
        return lambda: limiter


@dataclass(eq=False)
class _Piece:
    start: int
    end: int
    #: What arrived and waits for the extractor, in order: bytes in memory, or
    #: ``(offset, length)`` in the spill file.
    segments: collections.deque[bytes | tuple[int, int]] = field(default_factory=collections.deque)
    arrived: int = 0
    in_memory: int = 0
    done: bool = False


class RangedFetch:
    """Fetch one archive from ``source``, over ranges when it pays, into ``deliver``.

    ``deliver(piece)`` is awaited with the archive's bytes in order and
    answers False when the extractor has stopped. :meth:`run` returns True
    when the whole archive was delivered. ``slot()`` is held around each
    ranged request (the hub's per-host bound); ``tmp`` is the entry's
    download dir, where early pieces beyond :data:`MEMORY` wait (in a file
    with no name, so nothing is left whatever happens).
    """

    def __init__(
        self,
        source: RangedSource,
        transfer: Transfer,
        on_resume: OnResume,
        deliver: Deliver,
        *,
        connections: int | None,
        tmp: Path,
        slot: Slot,
        on_bytes: Callable[[], None] = lambda: None,
        guard: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        self._source = source
        self._transfer = transfer
        self._on_resume = on_resume
        self._deliver = deliver
        self._connections = connections
        self._tmp = tmp
        self._slot = slot
        self._on_bytes = on_bytes
        self._guard = guard
        self._tg: anyio.abc.TaskGroup | None = None
        self._split = Split(on_first=self._on_first)
        self._pieces: list[_Piece] = []
        self._next = 0  # the next piece a worker takes
        self._workers = 0
        self._wanted = 1  # connections in all, the first stream's included
        self._delivered = 0  # archive bytes handed on, in order
        self._memory = 0  # bytes of early pieces in memory
        self._head: _Piece | None = None  # the piece being handed on
        self._arrived = anyio.Event()  # a worker put bytes or finished a piece
        self._taken = anyio.Event()  # the extractor took bytes
        self._spill: IO[bytes] | None = None
        self._spill_lock = anyio.Lock()
        self._answered = math.inf  # when the first answer came (time.perf_counter())

    async def run(self) -> bool:
        whole = False
        try:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    whole = await self._first() and await self._rest()
                    if not whole:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                await raise_first(group)
        finally:
            if self._spill is not None:
                self._spill.close()
        return whole

    # -- the first stream ------------------------------------------------------

    def _on_first(self, first: Validators) -> None:
        """At the first answer: split now if asked for a count of connections."""
        self._answered = time.perf_counter()
        if self._connections is not None and self._connections > 1 and first.resumable:
            assert first.total is not None
            self._go(first, 0, min(self._connections, max(1, first.total // MIN_PIECE)))

    def _go(self, first: Validators, at: int, connections: int) -> None:
        """Let the first stream stop one piece past ``at``; workers fetch the rest."""
        assert first.total is not None
        if connections < 2:
            return
        cut = pieces(at, first.total, connections)
        if len(cut) < 2:
            return
        self._split.end = cut[0][1]
        self._pieces = [_Piece(a, b) for a, b in cut[1:]]
        self._wanted = connections
        for _ in range(connections - 1):
            self._start_worker()

    async def _first(self) -> bool:
        """Hand on the first stream's bytes as they come; decide the automatic split on the way."""
        split = self._split
        body = cast(
            "AsyncGenerator[bytes, None]",
            self._source.stream(self._transfer, self._on_resume, split),
        )
        # Time spent waiting on the network (not on the extractor) since the first
        # answer: the request's round trip before it says nothing about the rate.
        waited = 0.0
        streamed = 0
        auto = self._connections is None
        async with aclosing(body):
            while True:
                began = time.perf_counter()
                try:
                    data = await body.__anext__()
                except StopAsyncIteration:
                    break
                now = time.perf_counter()
                waited += now - max(began, self._answered)
                streamed += len(data)
                self._delivered += len(data)
                if not await self._deliver(data):
                    return False
                first = split.first
                if (
                    auto
                    and split.end is None
                    and first is not None
                    and first.resumable
                    and first.total is not None
                    and streamed >= _PROBE_BYTES
                ):
                    rate = streamed / max(waited, 1e-6)
                    remaining = first.total - self._delivered
                    n = auto_connections(rate, remaining)
                    if n > 1:
                        self._go(first, self._delivered, n)
                    elif remaining < AUTO_MIN_BYTES:
                        auto = False  # too little left to pay: decided
        # The first stream's connection is gone; a worker takes its place.
        if self._next < len(self._pieces) and self._workers < self._wanted:
            self._start_worker()
        return True

    # -- the ranges ------------------------------------------------------------

    def _start_worker(self) -> None:
        assert self._tg is not None
        self._workers += 1
        self._tg.start_soon(self._worker)

    async def _worker(self) -> None:
        first = self._split.first
        assert first is not None
        while self._next < len(self._pieces):
            piece = self._pieces[self._next]
            self._next += 1
            while piece.start - self._delivered > AHEAD:
                await self._wait_taken()
            async with self._slot():
                body = cast(
                    "AsyncGenerator[bytes, None]",
                    self._source.fetch_range(
                        piece.start, piece.end, first, self._transfer, self._on_resume
                    ),
                )
                async with aclosing(body):
                    async for data in body:
                        await self._put(piece, data)
            piece.done = True
            self._notify_arrived()

    async def _put(self, piece: _Piece, data: bytes) -> None:
        offset = piece.start + piece.arrived
        piece.arrived += len(data)
        self._on_bytes()
        # The piece being extracted is taken at once: its worker waits for the
        # extractor rather than spill it (the one stream's back-pressure).
        while piece is self._head and piece.in_memory >= _HEAD_BACKLOG:
            await self._wait_taken()
        if piece is self._head or self._memory + len(data) <= MEMORY:
            piece.segments.append(data)
            piece.in_memory += len(data)
            self._memory += len(data)
        else:
            with self._guard():
                fd = await self._spill_fd()
                await to_thread.run_sync(_pwrite, fd, data, offset)
            piece.segments.append((offset, len(data)))
        self._notify_arrived()

    async def _rest(self) -> bool:
        """Hand on the pieces in order, as they arrive."""
        for piece in self._pieces:
            self._head = piece
            self._notify_taken()  # its worker may be waiting on the backlog rule
            while True:
                while piece.segments:
                    segment = piece.segments.popleft()
                    if isinstance(segment, bytes):
                        data = segment
                        piece.in_memory -= len(data)
                        self._memory -= len(data)
                    else:
                        assert self._spill is not None
                        with self._guard():
                            data = await to_thread.run_sync(_pread, self._spill.fileno(), *segment)
                    self._delivered += len(data)
                    self._notify_taken()
                    if not await self._deliver(data):
                        return False
                if piece.done:
                    break
                event = self._arrived
                if not piece.segments and not piece.done:
                    await event.wait()
        self._head = None
        return True

    # -- plumbing ----------------------------------------------------------------

    def _notify_arrived(self) -> None:
        event, self._arrived = self._arrived, anyio.Event()
        event.set()

    def _notify_taken(self) -> None:
        event, self._taken = self._taken, anyio.Event()
        event.set()

    async def _wait_taken(self) -> None:
        await self._taken.wait()

    async def _spill_fd(self) -> int:
        async with self._spill_lock:  # two workers may spill first at once
            return await self._open_spill()

    async def _open_spill(self) -> int:
        if self._spill is None:
            # No name (O_TMPFILE where the OS has it, else unlinked at once): a
            # crash leaves nothing in the download dir, and no member can clash.
            self._spill = await to_thread.run_sync(
                lambda: tempfile.TemporaryFile(dir=self._tmp, prefix=".ranges-")  # noqa: SIM115
            )
        return self._spill.fileno()


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length:
        part = os.pread(fd, length, offset)
        if not part:
            raise OSError(f"the spill file ended {length:,} bytes early")
        parts.append(part)
        offset += len(part)
        length -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
