"""Progress display: turn the core's progress events into something a person can watch.

On a terminal (and with rich installed) a live ``rich.progress.Progress`` shows
one line per module being fetched and a total line; each finished module
leaves a one-line summary above it. Anywhere else (logs, CI, pipes) plain
one-line messages go to stderr, one per state change, downloads at most every
few seconds.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

from ._progress import ProgressEvent, ProgressKind

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ProgressDisplay", "error_text", "format_bytes", "short_handle"]

_PLAIN_INTERVAL = 5.0  # seconds between two "downloading" lines for one module in plain mode
_ERROR_WIDTH = 160  # characters of an error message shown on one line


def short_handle(handle: str, width: int = 40) -> str:
    """A handle shortened for one line: no scheme or query, and the end kept when too long.

    The end of a handle (model name, version) tells modules apart; the host
    and the leading path rarely do.
    """
    text = handle
    if "://" in handle:
        parts = urlsplit(handle)
        text = f"{parts.netloc}{parts.path}".rstrip("/") or handle
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :]


def format_bytes(n: float) -> str:
    """Decimal units, as download tools show them: ``12.3 MB``."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def error_text(error: BaseException | None, handle: str = "") -> str:
    """The first line of an error's message, without a leading ``"<handle>: "``.

    The line it goes on names the handle already.
    """
    if error is None:
        return "unknown error"
    if not isinstance(error, Exception):
        return "cancelled"  # a cancellation or KeyboardInterrupt, not a failure to explain
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if handle and text.startswith(f"{handle}: "):
        text = text[len(handle) + 2 :]
    return text if len(text) <= _ERROR_WIDTH else text[: _ERROR_WIDTH - 1] + "…"


@dataclass
class _Item:
    """What the display knows of one module while it is being fetched."""

    short: str
    queued_at: float
    task: TaskID | None = None
    first_byte_at: float | None = None
    done: int = 0
    total: int | None = None
    last_line_at: float = field(default=float("-inf"))


class ProgressDisplay:
    """A progress callback that draws what the hub is doing.

    ``start()`` before the first event, ``stop()`` after the last; the instance
    itself is the callback. Calls come on the event loop thread, so each one
    only updates a little state (rich redraws from its own thread), and a
    display problem never breaks a download: ``__call__`` never raises.

    ``console`` forces the rich display onto that console (tests pass one
    writing to a StringIO); ``fancy=False`` forces plain lines on ``stream``
    (stderr by default). By default rich is used when ``stream`` is a
    terminal; without rich installed the lines are always plain.
    """

    def __init__(
        self,
        *,
        console: Console | None = None,
        stream: TextIO | None = None,
        fancy: bool | None = None,
        interval: float = _PLAIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._items: dict[str, _Item] = {}
        self._finished = 0
        self._finished_bytes = 0
        self._seen = 0
        self._progress: Progress | None = None
        self._total_task: TaskID | None = None
        self._started = False
        if fancy is None:
            fancy = console is not None or _isatty(self.stream)
        if fancy and _rich_available():
            self._progress = _make_progress(console, self.stream, clock)

    @property
    def stream(self) -> TextIO:
        # Looked up at each use: test runners and CLIs swap sys.stderr.
        return self._stream if self._stream is not None else sys.stderr

    @property
    def fancy(self) -> bool:
        """Whether this display draws with rich (else it writes plain lines)."""
        return self._progress is not None

    def start(self) -> None:
        """Begin drawing (rich mode); plain mode needs no set-up."""
        if self._progress is not None and not self._started:
            self._started = True
            self._progress.start()

    def stop(self) -> None:
        """Draw the final state and stop the redraw thread; safe to call twice."""
        if self._progress is not None and self._started:
            self._started = False
            self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        # A broken display (a closed stream, a rich quirk) must never fail a download.
        with contextlib.suppress(Exception):
            if self._progress is not None:
                self._rich_event(self._progress, event)
            else:
                self._plain_event(event)

    # -- rich ----------------------------------------------------------------

    def _rich_event(self, progress: Progress, event: ProgressEvent) -> None:
        kind = event.kind
        if kind in (ProgressKind.DONE, ProgressKind.CACHED, ProgressKind.FAILED):
            item = self._items.pop(event.handle, None)
            if item is not None:
                if item.task is not None:
                    progress.remove_task(item.task)
                self._finished += 1
                self._finished_bytes += item.done
                self._update_total(progress)
                # rich reprints its last frame under a printed line: draw the new one first.
                progress.refresh()
            self._finish(progress, event, item)
            return
        item = self._item(event.handle)
        if item.task is None:
            item.task = progress.add_task(item.short, total=None, status="queued")
        if kind is ProgressKind.QUEUED:
            return
        if kind is ProgressKind.DOWNLOADING:
            if item.first_byte_at is None:
                item.first_byte_at = self._clock()
            item.done, item.total = event.done, event.total
            progress.update(item.task, completed=event.done, total=event.total, status="")
        elif kind is ProgressKind.EXTRACTING:
            progress.update(item.task, status="extracting")
        elif kind is ProgressKind.RETRYING:
            item.done = event.done
            progress.update(item.task, completed=event.done, status=f"retry {event.attempt}")
            progress.console.print(
                f"[yellow]↻[/] {_escape(item.short)}: retrying (attempt {event.attempt}): "
                f"{_escape(error_text(event.error, event.handle))}",
                highlight=False,
            )
        self._update_total(progress)

    def _finish(self, progress: Progress, event: ProgressEvent, item: _Item | None) -> None:
        short = _escape(item.short if item is not None else short_handle(event.handle))
        if event.kind is ProgressKind.FAILED:
            line = f"[red]✗[/] {short}: {_escape(error_text(event.error, event.handle))}"
        elif event.kind is ProgressKind.CACHED:
            line = f"[dim]✓ {short} (cached)[/]"
        else:
            line = f"[green]✓[/] {short}  {self._summary(item)}"
        progress.console.print(line, highlight=False)

    def _update_total(self, progress: Progress) -> None:
        if self._total_task is None:
            if not self._items:
                return
            self._total_task = progress.add_task("total", total=None, status="")
        active = list(self._items.values())
        totals = [i.total for i in active]
        total = None if None in totals else self._finished_bytes + sum(t or 0 for t in totals)
        done = self._finished_bytes + sum(i.done for i in active)
        progress.update(
            self._total_task,
            completed=done,
            total=total,
            status=f"{self._finished}/{self._seen} done",
        )

    # -- plain ---------------------------------------------------------------

    def _plain_event(self, event: ProgressEvent) -> None:
        kind = event.kind
        handle = event.handle
        if kind in (ProgressKind.DONE, ProgressKind.CACHED, ProgressKind.FAILED):
            item = self._items.pop(handle, None)
            if kind is ProgressKind.FAILED:
                self._line(f"failed {handle}: {error_text(event.error, event.handle)}")
            elif kind is ProgressKind.CACHED:
                self._line(f"cached {handle} -> {event.path}")
            else:
                self._line(f"done {handle}: {self._summary(item)} -> {event.path}")
            return
        item = self._item(handle)
        if kind is ProgressKind.QUEUED:
            self._line(f"queued {handle}")
        elif kind is ProgressKind.DOWNLOADING:
            now = self._clock()
            first = item.first_byte_at is None
            if first:
                item.first_byte_at = now
            item.done, item.total = event.done, event.total
            if now - item.last_line_at >= self._interval:
                item.last_line_at = now
                if first:
                    size = f" ({format_bytes(event.total)})" if event.total else ""
                    self._line(f"downloading {handle}{size}")
                else:
                    self._line(f"downloading {handle}: {_fraction(event.done, event.total)}")
        elif kind is ProgressKind.RETRYING:
            item.done = event.done
            reason = error_text(event.error, handle)
            self._line(f"retrying {handle} (attempt {event.attempt}): {reason}")

    def _line(self, text: str) -> None:
        stream = self.stream
        stream.write(f"asynchub: {text}\n")
        stream.flush()

    # -- shared --------------------------------------------------------------

    def _item(self, handle: str) -> _Item:
        item = self._items.get(handle)
        if item is None:
            item = self._items[handle] = _Item(short_handle(handle), queued_at=self._clock())
            self._seen += 1
        return item

    def _summary(self, item: _Item | None) -> str:
        if item is None:
            return "fetched"
        elapsed = self._clock() - (item.first_byte_at or item.queued_at)
        text = f"{format_bytes(item.done)} in {elapsed:.1f} s"
        if elapsed > 0 and item.done:
            text += f" ({format_bytes(item.done / elapsed)}/s)"
        return text


def _fraction(done: int, total: int | None) -> str:
    if not total:
        return format_bytes(done)
    return f"{format_bytes(done)} of {format_bytes(total)} ({100 * done // total}%)"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _rich_available() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _make_progress(console: Console | None, stream: TextIO, clock: Callable[[], float]) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", style="dim"),
        console=console if console is not None else Console(file=stream),
        get_time=clock,
        # The caller's own prints must stay on stdout; rich would route them to our console.
        redirect_stdout=False,
        redirect_stderr=False,
    )
