"""What more than one command uses: the shared options, the one error printer, the runner.

Every option that more than one command takes is declared here, once; every
command reports a HubError through :func:`errors_as_exit`, so scripts parse one
shape (``error: <message on one line>`` on stderr, exit status 1).
:func:`standard_streams` wraps the whole command line, so that an OSError
anywhere, its own output's included (a closed stdout, a broken pipe, a full
disk), is that same one line; :func:`run` makes Ctrl-C exit 130 and SIGTERM
143, after the clean-up.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from .._display import ProgressDisplay
from .._progress import ProgressEvent, silent
from ..errors import HubError

__all__ = [
    "Option",
    "OutputError",
    "cache_dir_option",
    "connections_option",
    "dry_run_option",
    "emit_json",
    "errors_as_exit",
    "from_file_option",
    "json_option",
    "offline_option",
    "parse_duration",
    "progress_callback",
    "quiet_option",
    "run",
    "showing",
    "standard_streams",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


# -- options -------------------------------------------------------------------------


class Option:
    """An option several commands take, declared once.

    ``@quiet_option`` adds it to a command as declared here;
    ``@offline_option.with_help("...")`` adds it with that command's own help text
    (the same flag, said the way that command means it).
    """

    def __init__(self, *decls: str, **attrs: Any) -> None:
        self.decls = decls
        self.attrs = attrs

    def __call__(self, func: _F) -> _F:
        return click.option(*self.decls, **self.attrs)(func)

    def with_help(self, text: str) -> Callable[[_F], _F]:
        def add(func: _F) -> _F:
            return click.option(*self.decls, **{**self.attrs, "help": text})(func)

        return add


cache_dir_option = Option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The cache dir (default: $TFHUB_CACHE_DIR, else <tmp>/tfhub_modules).",
)
json_option = Option("--json", "as_json", is_flag=True, help="Print JSON (see docs).")
quiet_option = Option("-q", "--quiet", is_flag=True, help="No progress display.")
from_file_option = Option(
    "--from-file",
    type=click.File("r"),
    default=None,
    help="Read more handles from FILE, one a line ('#' comments; '-' is stdin).",
)
offline_option = Option(
    "--offline", is_flag=True, help="Use the cache only; fail for anything missing."
)
connections_option = Option(
    "--connections",
    metavar="N|auto",
    default=None,
    help=(
        "Connections per http(s) archive: its byte ranges fetched at once, extracted in "
        "order. 'auto' (the default: $ASYNCHUB_CONNECTIONS, else auto) splits a large "
        "archive whose one stream is slow; 1 is one stream."
    ),
)
dry_run_option = Option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> datetime.timedelta:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"`` or a sum like ``"1d12h"``.

    Raises ValueError with the accepted forms for anything else.
    """
    spec = text.strip().lower()
    pos = 0
    seconds = 0.0
    for match in _DURATION.finditer(spec):
        if match.start() != pos:
            break
        seconds += float(match[1]) * _UNITS[match[2]]
        pos = match.end()
    if not spec or pos != len(spec):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit s, m, h, d or w "
            "(e.g. 30d, 12h, 90m, 1d12h)"
        )
    return datetime.timedelta(seconds=seconds)


# -- output ------------------------------------------------------------------------------


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """Turn a HubError into ``error: <message on one line>`` on stderr and exit status 1.

    Every command reports its failures this way, so scripts parse one shape.
    """
    try:
        yield
    except HubError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        raise click.exceptions.Exit(1) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@contextmanager
def showing(display: Any) -> Iterator[None]:
    """Draw the progress display (if any) while the body runs."""
    if display is None:
        yield
        return
    display.start()
    try:
        yield
    finally:
        display.stop()


def progress_callback(quiet: bool) -> tuple[Callable[[ProgressEvent], None], Any]:
    """The hub's progress callback: rich on a terminal, plain lines elsewhere, none if quiet."""
    if quiet:
        return silent, None
    display = ProgressDisplay()
    return display, display


# -- the event loop ----------------------------------------------------------------------


#: Exit statuses after a signal, as shells report a death by one (128 + its number).
_SIGNAL_EXITS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def run(func: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``func`` on an event loop; Ctrl-C or SIGTERM cancels it, cleanly, and exits 130 or 143.

    The signals are received by the loop itself (a signal receiver), not left to
    the default KeyboardInterrupt or death: asyncio's runner turns a
    KeyboardInterrupt into a cancellation of its main task, which a command whose
    cleanup shields itself (worker processes, tmp dirs) may finish normally,
    exiting 0 as if nothing happened; and SIGTERM's default (what a supervisor or
    ``kill`` sends) would leave the ``.tmp`` dir and the lock behind, so another
    host would wait ``lock_stale_after`` for a download nobody makes.
    """
    import anyio

    stopped_by: list[signal.Signals] = []
    result: list[_T] = []
    failed: list[Exception] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(*_SIGNAL_EXITS) as signals:
                    async for signum in signals:
                        stopped_by.append(signal.Signals(signum))
                        tg.cancel_scope.cancel()
                        return

            async def work() -> None:
                # Its error is raised as itself below, not wrapped in the group's.
                try:
                    result.append(await func())
                except Exception as exc:
                    failed.append(exc)
                finally:
                    tg.cancel_scope.cancel()

            # Signals reach only a main thread's loop (not, e.g., a test's CliRunner).
            if os.name == "posix" and threading.current_thread() is threading.main_thread():
                tg.start_soon(watch)
            tg.start_soon(work)

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        stopped_by.append(signal.SIGINT)
    if failed and not stopped_by:
        raise failed[0]
    if stopped_by:
        # The core has removed its .tmp dirs and locks on the way out.
        code, what = _SIGNAL_EXITS[stopped_by[0]]
        click.echo(f"error: {what}", err=True)
        raise click.exceptions.Exit(code)
    return result[0]


# -- the standard streams --------------------------------------------------------------


class OutputError(Exception):
    """The command's own output could not be written (a closed stdout, a broken pipe, a full disk).

    Not an OSError on purpose: click would end a broken pipe silently, with no word.
    """

    def __init__(self, exc: OSError) -> None:
        why = "stdout is closed" if exc.errno == errno.EBADF else exc.strerror or str(exc)
        super().__init__(f"cannot write the output: {why}")


class _Stream(io.TextIOBase):
    """A standard stream that remembers its first failure.

    stdout's failures are the command's: each use after one raises
    :class:`OutputError` again (click probes a stream with writes whose errors
    it swallows, so raising once is not enough), and :func:`standard_streams`
    says it at the end. stderr is where failures are said, so its own are
    swallowed, and it is pointed at the null device: the exit status still tells.
    """

    def __init__(self, stream: TextIO, *, fail: bool) -> None:
        self.stream = stream
        self.failed: OSError | None = None
        self._fail = fail

    def _failure(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = exc
            if not self._fail:
                _silence(self.stream)
        if self._fail:
            raise OutputError(self.failed) from exc

    def write(self, text: str) -> int:
        if self.failed is not None and self._fail:
            raise OutputError(self.failed)
        try:
            return self.stream.write(text)
        except OSError as exc:
            self._failure(exc)
            return len(text)

    def flush(self) -> None:
        if self.failed is not None and self._fail:
            raise OutputError(self.failed)
        try:
            self.stream.flush()
        except OSError as exc:
            self._failure(exc)

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Never closes (nor flushes) the process's stream: its owner does."""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    @property
    def buffer(self) -> Any:
        return self.stream.buffer


def _silence(stream: TextIO) -> None:
    """Point a failed stream at the null device, so the interpreter's last flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)


def _reserve_standard_fds() -> None:
    """Give any closed fd 0, 1 or 2 the null device, opened the wrong way round.

    A process started with them closed (``<&- >&-``, as some supervisors do)
    would otherwise hand those numbers to the next file or socket it opens: a
    print would then write into a module's file, and a forked worker's socket
    would be overwritten when the worker sets up its stderr. Opened the wrong way
    round, a read of stdin or a write to stdout still fails as on a closed fd
    (EBADF), so a closed stdout is said, not silently dropped.
    """
    for fd, flags in ((0, os.O_WRONLY), (1, os.O_RDONLY), (2, os.O_RDONLY)):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, flags)
            if opened != fd:  # pragma: no cover - the lowest free number is fd itself
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's, never closed
    if sys.stdout is None:
        # stderr stays None when it was closed: click then writes nothing there.
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115


def _os_error_text(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc.strerror or exc)


@contextmanager
def standard_streams() -> Iterator[None]:
    """The whole command line's run: every OSError it meets is one ``error:`` line and exit 1.

    Closed standard fds are reserved first (:func:`_reserve_standard_fds`). The
    output is flushed here, before the interpreter's own last flush (which would
    report a failure as a traceback and exit 120). A failure that could not even
    be said on stderr still exits 1.
    """
    _reserve_standard_fds()
    saved = sys.stdout, sys.stderr
    out = None if sys.stdout is None else _Stream(sys.stdout, fail=True)
    if out is not None:
        sys.stdout = out
    if sys.stderr is not None:
        sys.stderr = _Stream(sys.stderr, fail=False)
    try:
        try:
            yield
        finally:
            if out is not None:
                with contextlib.suppress(OutputError):
                    out.flush()
                if out.failed is not None:  # raised somewhere, maybe swallowed there
                    _silence(out.stream)  # so the interpreter's last flush cannot fail
                    raise OutputError(out.failed)
    except OutputError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except HubError as exc:  # one that no errors_as_exit() was around
        click.echo(f"error: {_one_line(exc)}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        # Not the output's: the store makes its own CacheError; this is a backstop.
        click.echo(f"error: {_os_error_text(exc)}", err=True)
        raise SystemExit(1) from None
    finally:
        sys.stdout, sys.stderr = saved
