"""What more than one command uses: the shared options, the one error printer, the runner.

Every option that more than one command takes is declared here, once; every
command reports a HubError through :func:`errors_as_exit`, so scripts parse one
shape (``error: <message on one line>`` on stderr, exit status 1).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from .._display import ProgressDisplay
from .._progress import ProgressEvent, silent
from ..errors import HubError

__all__ = [
    "Option",
    "cache_dir_option",
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
        click.echo(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", err=True)
        raise click.exceptions.Exit(1) from exc


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


def run(func: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``func`` on an event loop; Ctrl-C cancels it, cleanly, and exits 130.

    Ctrl-C is received by the loop itself (a signal receiver), not left to the
    default KeyboardInterrupt: asyncio's runner turns that into a cancellation
    of its main task, which a command whose cleanup shields itself (worker
    processes, tmp dirs) may finish normally, exiting 0 as if nothing happened.
    """
    import anyio

    interrupted = False
    result: list[_T] = []
    failed: list[Exception] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT) as signals:
                    async for _ in signals:
                        interrupted = True
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
        interrupted = True
    if failed and not interrupted:
        raise failed[0]
    if interrupted:
        # The core has removed its .tmp dirs and locks on the way out.
        click.echo("error: interrupted", err=True)
        raise click.exceptions.Exit(130)
    return result[0]
