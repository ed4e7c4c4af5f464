"""The ``prefetch``, ``resolve``, ``lock``, ``mirror`` and ``cache`` commands of ``asynchub``.

``asynchub.cli`` adds :data:`COMMANDS` to its click group. Every command exits
non-zero with a one-line ``error: …`` on stderr when a HubError stops it, and
prints machine-readable JSON with ``--json`` (keys documented in docs/caching.md).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from . import _config
from ._config import default_cache_dir
from ._display import ProgressDisplay, error_text, format_bytes
from ._handles import HandleKind, key_of, parse
from ._integrity import LockEntry, lock_text, read_lock
from ._progress import ProgressEvent, silent
from ._store import admin as tools
from .errors import HubError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["COMMANDS", "parse_duration"]

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

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


def _duration_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime.timedelta | None:
    # A callback rather than a ParamType subclass: ParamType is generic only in newer clicks.
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@contextmanager
def _errors() -> Iterator[None]:
    """Turn a HubError into ``error: <message on one line>`` on stderr and exit status 1.

    The same form as ``asynchub.cli``'s own commands, so scripts parse one shape.
    """
    try:
        yield
    except HubError as exc:
        click.echo(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", err=True)
        raise click.exceptions.Exit(1) from exc


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _cache_dir_option(func: _F) -> _F:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="The cache dir (default: $TFHUB_CACHE_DIR, else <tmp>/tfhub_modules).",
    )(func)


def _json_option(func: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (see docs).")(func)


@contextmanager
def _showing(display: Any) -> Iterator[None]:
    """Draw the progress display (if any) while the body runs."""
    if display is None:
        yield
        return
    display.start()
    try:
        yield
    finally:
        display.stop()


def _progress_callback(quiet: bool) -> tuple[Callable[[ProgressEvent], None], Any]:
    """The hub's progress callback: rich on a terminal, plain lines elsewhere, none if quiet."""
    if quiet:
        return silent, None
    display = ProgressDisplay()
    return display, display


# -- prefetch / resolve --------------------------------------------------------------


def _fork_workers(config: _config.HubConfig, handles: int, processes: int | None) -> int:
    """Fork the worker processes a prefetch will use, if any; how many were forked.

    ``processes`` (-p) is honoured as given; by default the number comes from
    :func:`~asynchub._workers.plan_forked`. 0 where fork is unsafe or
    unavailable (another thread, not Linux) or the downloads stay in this
    process anyway (offline): prefetch then spawns what it needs.
    """
    from . import _workers
    from ._hub import AsyncHub
    from ._sources import net

    if config.offline or not _workers.can_fork():
        return 0
    if processes is None:
        count = _workers.plan_forked(handles, _workers.usable_cores(), config.max_concurrency)
    else:
        count = processes if processes >= 2 and handles >= 2 else 0
    if not count:
        return 0
    net.ssl_context()  # made once, here, rather than once in every child
    try:
        _workers.adopt(_workers.prefork(count, AsyncHub.from_config))
    except OSError:
        return 0  # fork refused (a process limit): prefetch spawns what it can
    return count


def _read_handles(handles: Sequence[str], from_file: IO[str] | None) -> list[str]:
    out = list(handles)
    if from_file is not None:
        for line in from_file:
            text = line.strip()
            if text and not text.startswith("#"):
                out.append(text)
    return out


@click.command("prefetch")
@click.argument("handles", nargs=-1, metavar="HANDLE...")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Downloads at once.")
@_cache_dir_option
@click.option(
    "--from-file",
    type=click.File("r"),
    default=None,
    help="Read more handles from FILE, one a line ('#' comments; '-' is stdin).",
)
@click.option("--offline", is_flag=True, help="Use the cache only; fail for anything missing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option(
    "--lockfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Refuse any archive that does not match this lock file (from 'asynchub lock'), "
        "and any handle it does not list. With no HANDLE, fetch every handle it lists."
    ),
)
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help=(
        "Spread the downloads over up to N worker processes, for more cores than one "
        "process can use (1 turns them off). They are forked at start-up, so they cost "
        "milliseconds. Default: one per core, with 2 downloads and a -j slot each, at "
        "most 4, and none below 2. Cached handles go to none."
    ),
)
@_json_option
def prefetch_command(
    handles: tuple[str, ...],
    jobs: int | None,
    cache_dir: Path | None,
    from_file: IO[str] | None,
    offline: bool,
    quiet: bool,
    lockfile: Path | None,
    processes: int | None,
    as_json: bool,
) -> None:
    """Download HANDLEs into the cache, several at once.

    Prints each handle's path (or its error) in input order; exits 1 if any
    failed. Progress goes to stderr: live bars on a terminal, plain lines
    elsewhere. One process uses about 1.6 cores (held back by Python's GIL), so
    downloads run in worker processes forked at start-up (--processes); -j
    bounds the downloads at once across all of them.
    """
    from ._hub import AsyncHub

    wanted = _read_handles(handles, from_file)
    if not wanted and lockfile is not None:
        with _errors():
            wanted = sorted(read_lock(lockfile))
    if not wanted:
        raise click.UsageError("no handles given (pass HANDLE... or --from-file FILE)")
    with _errors():
        config = _config.HubConfig.from_env(
            cache_dir=cache_dir,
            offline=True if offline else None,
            max_concurrency=jobs,
            lockfile=lockfile,
        )
    callback, display = _progress_callback(quiet)  # starts no thread before start()
    # Worker processes are forked now, before any thread or event loop: they start
    # in milliseconds where a new interpreter takes ~0.25 s (_workers). prefetch
    # hands them work, or ends them when it keeps everything in this process.
    workers = _fork_workers(config, len(set(wanted)), processes)

    async def run() -> Sequence[Path | HubError]:
        async with AsyncHub(
            cache_dir=config.cache_dir,
            offline=config.offline,
            max_concurrency=config.max_concurrency,
            progress=callback,
            lockfile=config.lockfile,
        ) as hub:
            return await hub.prefetch(
                wanted,
                return_exceptions=True,
                processes=workers or ("auto" if processes is None else processes),
            )

    try:
        with _errors(), _showing(display):
            results = _run(run)
    finally:
        if workers:
            from . import _workers

            _workers.release()
    failed = [(h, r) for h, r in zip(wanted, results, strict=True) if isinstance(r, HubError)]
    distinct = len(set(wanted))
    failed_distinct = len({h for h, _ in failed})
    if as_json:
        _emit_json(
            {
                "results": [_result_json(h, r) for h, r in zip(wanted, results, strict=True)],
                "total": distinct,
                "failed": failed_distinct,
            }
        )
    else:
        for handle, result in zip(wanted, results, strict=True):
            if not isinstance(result, HubError):
                click.echo(f"{result}\t{handle}")
    seen: set[str] = set()
    for handle, error in failed:
        if handle not in seen:
            seen.add(handle)
            click.echo(f"failed: {handle}: {error_text(error, handle)}", err=True)
    if failed:
        click.echo(f"error: {failed_distinct} of {distinct} handles failed", err=True)
        raise click.exceptions.Exit(1)


def _result_json(handle: str, result: Path | HubError) -> dict[str, Any]:
    if isinstance(result, HubError):
        return {
            "handle": handle,
            "key": key_of(handle),
            "ok": False,
            "path": None,
            "error": _first_line(result),
            "error_type": type(result).__name__,
        }
    return {
        "handle": handle,
        "key": key_of(handle),
        "ok": True,
        "path": str(result),
        "error": None,
        "error_type": None,
    }


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@click.command("resolve")
@click.argument("handle")
@_cache_dir_option
@click.option("--offline", is_flag=True, help="Use the cache only; fail if it is missing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_json_option
def resolve_command(
    handle: str, cache_dir: Path | None, offline: bool, quiet: bool, as_json: bool
) -> None:
    """Fetch HANDLE into the cache if needed and print its local path."""
    from ._hub import AsyncHub

    callback, display = _progress_callback(quiet)

    async def run() -> Path:
        async with AsyncHub(
            cache_dir=cache_dir, offline=True if offline else None, progress=callback
        ) as hub:
            return await hub.resolve(handle)

    with _errors(), _showing(display):
        path = _run(run)
    if as_json:
        _emit_json({"handle": handle, "path": str(path)})
    else:
        click.echo(str(path))


# -- lock / mirror ---------------------------------------------------------------------


@click.command("lock")
@click.argument("handles", nargs=-1, metavar="HANDLE...")
@_cache_dir_option
@click.option(
    "--from-file",
    type=click.File("r"),
    default=None,
    help="Read more handles from FILE, one a line ('#' comments; '-' is stdin).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def lock_command(
    handles: tuple[str, ...], cache_dir: Path | None, from_file: IO[str] | None, quiet: bool
) -> None:
    """Print a lock file pinning each HANDLE: its archive's sha256 and size, its content digest.

    Fetches from the origin what the cache does not hold with a digest from the
    origin (mirrors are not used). Save it (asynchub lock ... > asynchub.lock)
    and pass it as AsyncHub(lockfile=...) or 'asynchub prefetch --lockfile'.
    """
    from ._hub import AsyncHub

    wanted = _read_handles(handles, from_file)
    if not wanted:
        raise click.UsageError("no handles given (pass HANDLE... or --from-file FILE)")
    callback, display = _progress_callback(quiet)

    async def run() -> list[LockEntry]:
        import anyio

        found: dict[str, LockEntry] = {}
        # No mirrors and no lock file from the environment: digests come from the origin.
        async with (
            AsyncHub(cache_dir=cache_dir, progress=callback, mirrors=[], lockfile="") as hub,
            anyio.create_task_group() as tg,
        ):

            async def one(handle: str) -> None:
                found[handle] = await hub.lock_entry(handle)

            for handle in dict.fromkeys(wanted):
                tg.start_soon(one, handle)
        return [found[h] for h in dict.fromkeys(wanted)]

    with _errors(), _showing(display):
        entries = _run_hub_errors(run)
    click.echo(lock_text(entries), nl=False)


@click.group("mirror")
def mirror_group() -> None:
    """Keep copies of modules where a fleet fetches them first (AsyncHub(mirrors=...))."""


@mirror_group.command("push")
@click.argument("mirror")
@click.argument("handles", nargs=-1, required=True, metavar="HANDLE...")
@_cache_dir_option
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_json_option
def mirror_push(
    mirror: str, handles: tuple[str, ...], cache_dir: Path | None, quiet: bool, as_json: bool
) -> None:
    """Upload each HANDLE's cached module to MIRROR as <cache key>.tar.gz (packed reproducibly).

    MIRROR is s3://bucket[/prefix], gs://bucket[/prefix] or a local directory.
    HANDLEs are http(s) URLs (mirrors stand in for those); one not cached yet
    is fetched from its origin first.
    """
    from ._hub import AsyncHub
    from ._sources import mirrors as _mirrors

    with _errors():
        for handle in handles:
            if parse(handle).kind is not HandleKind.URL:
                raise HubError(
                    f"{handle}: mirrors stand in for http(s) handles only", handle=handle
                )
        if _mirrors.kind_of(_mirrors.normalise(mirror)) == "http":
            raise HubError(
                f"cannot push to {mirror}: an http(s) mirror is read-only here; push to the "
                "bucket or directory behind it",
                handle=mirror,
            )
    callback, display = _progress_callback(quiet)

    async def run() -> list[tuple[str, str]]:
        pushed = []
        async with AsyncHub(cache_dir=cache_dir, progress=callback, mirrors=[]) as hub:
            for handle in dict.fromkeys(handles):
                path = await hub.resolve(handle)
                where = await _mirrors.push(mirror, path, key_of(handle), hub.object_stores)
                pushed.append((handle, where))
        return pushed

    with _errors(), _showing(display):
        pushed = _run_hub_errors(run)
    if as_json:
        _emit_json({"mirror": mirror, "pushed": [{"handle": h, "to": w} for h, w in pushed]})
    else:
        for handle, where in pushed:
            click.echo(f"{where}\t{handle}")


def _run_hub_errors(func: Callable[[], Awaitable[_T]]) -> _T:
    """:func:`_run`, with a lone HubError out of a task group raised as itself."""
    try:
        return _run(func)
    except BaseExceptionGroup as group:
        errors = [e for e in _leaves(group) if isinstance(e, HubError)]
        if errors:
            raise errors[0] from group
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _run(func: Callable[[], Awaitable[_T]]) -> _T:
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


# -- cache ----------------------------------------------------------------------------


@click.group("cache")
def cache_group() -> None:
    """Inspect and tidy the module cache (shared with tensorflow_hub)."""


def _dir(cache_dir: Path | None) -> Path:
    return cache_dir if cache_dir is not None else default_cache_dir()


@cache_group.command("path")
@_cache_dir_option
@_json_option
def cache_path(cache_dir: Path | None, as_json: bool) -> None:
    """Print the cache dir in use (it need not exist yet)."""
    path = _dir(cache_dir)
    if as_json:
        _emit_json({"cache_dir": str(path), "exists": path.is_dir()})
    else:
        click.echo(str(path))


@cache_group.command("ls")
@_cache_dir_option
@_json_option
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List the entries: key, size, when fetched, status, handle."""
    root = _dir(cache_dir)
    with _errors():
        entries = tools.list_entries(root)
    if as_json:
        _emit_json({"cache_dir": str(root), "entries": [e.to_json() for e in entries]})
        return
    if not entries:
        click.echo(f"no entries in {root}", err=True)
        return
    for e in entries:
        fetched = e.fetched.astimezone().strftime("%Y-%m-%d %H:%M") if e.fetched else "-"
        status = "downloading" if e.locked else "complete" if e.complete else "INCOMPLETE"
        click.echo(
            f"{e.key[:12]}  {_human(e.size):>10}  {fetched:16}  {status:11}  {e.handle or '?'}"
        )
    total = sum(e.size for e in entries)
    click.echo(f"{len(entries)} entries, {_human(total)} in {root}", err=True)


def _human(n: int) -> str:
    return format_bytes(n)


def _print_removals(removals: list[tools.Removal], dry_run: bool, as_json: bool) -> None:
    total = sum(r.size for r in removals)
    if as_json:
        _emit_json({"dry_run": dry_run, "removed": [r.to_json() for r in removals], "bytes": total})
        return
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        click.echo(f"{verb} {r.kind:10} {r.path}  ({_human(r.size)}; {r.reason})")
    click.echo(f"{verb} {len(removals)} paths, {_human(total)}", err=True)


@cache_group.command("rm")
@click.argument("handle_or_key", metavar="HANDLE|KEY")
@_cache_dir_option
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@_json_option
def cache_rm(handle_or_key: str, cache_dir: Path | None, dry_run: bool, as_json: bool) -> None:
    """Remove one entry, named by its handle or its key (refused while it downloads)."""
    with _errors():
        removals = tools.remove(_dir(cache_dir), handle_or_key, dry_run=dry_run)
    _print_removals(removals, dry_run, as_json)


@cache_group.command("prune")
@_cache_dir_option
@click.option(
    "--older-than",
    metavar="DURATION",
    default=None,
    callback=_duration_option,
    help="Also remove entries fetched longer ago than this (30d, 12h, 90m, 2w).",
)
@click.option("--incomplete", is_flag=True, help="Also remove entries that are not complete.")
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@_json_option
def cache_prune(
    cache_dir: Path | None,
    older_than: datetime.timedelta | None,
    incomplete: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove leftover download dirs and stale locks, and the entries asked for.

    Anything a live process is downloading is left alone.
    """
    with _errors():
        removals = tools.prune(
            _dir(cache_dir), older_than=older_than, incomplete=incomplete, dry_run=dry_run
        )
    _print_removals(removals, dry_run, as_json)


@cache_group.command("verify")
@_cache_dir_option
@click.option(
    "--digests",
    is_flag=True,
    help=(
        "Also read every file and compare its sha256 with the one recorded when it was "
        "written (entries fetched with file_digests=True or ASYNCHUB_FILE_DIGESTS=1, "
        "and s3:// / gs:// prefixes)."
    ),
)
@_json_option
def cache_verify(cache_dir: Path | None, digests: bool, as_json: bool) -> None:
    """Check every entry against its completeness record; exit 1 if any is incomplete."""
    root = _dir(cache_dir)
    with _errors():
        checks = tools.verify(root, digests=digests)
    bad = [c for c in checks if not c.complete]
    if as_json:
        _emit_json(
            {"cache_dir": str(root), "ok": not bad, "entries": [c.to_json() for c in checks]}
        )
    else:
        for c in checks:
            if c.complete:
                note = "" if c.has_manifest else " (no manifest: saved_model.pb present)"
                if digests:
                    note += (
                        " (files hashed: as recorded)"
                        if c.digests_checked
                        else " (no file digests recorded: sizes only)"
                    )
                click.echo(f"ok          {c.key[:12]}  {c.handle or '?'}{note}")
                continue
            click.echo(f"INCOMPLETE  {c.key[:12]}  {c.handle or '?'}: {c.problem}")
            for rel in c.missing:
                click.echo(f"    missing     {rel}")
            for rel, want, have in c.wrong_size:
                click.echo(f"    wrong size  {rel}: {have} bytes, expected {want}")
            for rel in c.wrong_digest:
                click.echo(f"    changed     {rel}: its sha256 is not the recorded one")
        click.echo(f"{len(checks) - len(bad)} of {len(checks)} entries complete", err=True)
    if bad:
        raise click.exceptions.Exit(1)


#: The commands ``asynchub.cli`` registers into its group.
COMMANDS: list[click.Command] = [
    prefetch_command,
    resolve_command,
    lock_command,
    mirror_group,
    cache_group,
]


def _main(argv: Sequence[str] | None = None) -> None:
    """Run these commands under a stand-alone group (for tests, until cli.py adds them)."""
    group = click.Group(
        "asynchub",
        help="asynchub: TensorFlow Hub-style modules, async-first.",
        context_settings={"help_option_names": ["-h", "--help"]},  # as asynchub.cli.main
    )
    for command in COMMANDS:
        group.add_command(command)
    group.main(args=list(argv) if argv is not None else None, prog_name="asynchub")


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
