"""The ``prefetch``, ``resolve``, ``lock`` and ``mirror push`` commands.

``prefetch`` forks its worker processes (:func:`fork_workers`) before any
thread or event loop starts. With ``--json`` they print machine-readable JSON
(keys documented in docs/caching.md).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from .. import _config
from .._display import error_text
from .._handles import HandleKind, key_of, parse
from .._integrity import LockEntry, lock_text, read_lock
from ..errors import HubError, leaves
from .common import (
    cache_dir_option,
    connections_option,
    emit_json,
    errors_as_exit,
    from_file_option,
    json_option,
    offline_option,
    progress_callback,
    quiet_option,
    run,
    showing,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["fork_workers", "lock_command", "mirror_group", "prefetch_command", "resolve_command"]

_T = TypeVar("_T")


# -- prefetch / resolve --------------------------------------------------------------


def fork_workers(config: _config.HubConfig, handles: int, processes: int | None) -> int:
    """Fork the worker processes a prefetch will use, if any; how many were forked.

    ``processes`` (-p) is honoured as given; by default the number comes from
    :func:`~asynchub._workers.plan_forked`. 0 where fork is unsafe or
    unavailable (another thread, not Linux) or the downloads stay in this
    process anyway (offline): prefetch then spawns what it needs.
    """
    from .. import _workers
    from .._hub import AsyncHub
    from .._sources import net

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
    """The handles given, then --from-file's; a HubError if the file cannot be read."""
    out = list(handles)
    if from_file is not None:
        try:
            for line in from_file:
                text = line.strip()
                if text and not text.startswith("#"):
                    out.append(text)
        except OSError as exc:  # e.g. '-' with stdin closed
            name = getattr(from_file, "name", "--from-file")
            where = "stdin" if name in (0, "<stdin>", "-") else name
            raise HubError(f"cannot read handles from {where}: {exc.strerror or exc}") from exc
    return out


@click.command("prefetch")
@click.argument("handles", nargs=-1, metavar="HANDLE...")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Downloads at once.")
@connections_option
@cache_dir_option
@from_file_option
@offline_option
@quiet_option
@click.option(
    "--lockfile",
    # A str, not a Path: '' (turn $ASYNCHUB_LOCKFILE off) must not become '.'.
    type=click.Path(dir_okay=False),
    default=None,
    help=(
        "Refuse any archive that does not match this lock file (from 'asynchub lock'), "
        "and any handle it does not list. With no HANDLE, fetch every handle it lists. "
        "Default: $ASYNCHUB_LOCKFILE; '' turns that off."
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
@json_option
def prefetch_command(
    handles: tuple[str, ...],
    jobs: int | None,
    connections: str | None,
    cache_dir: Path | None,
    from_file: IO[str] | None,
    offline: bool,
    quiet: bool,
    lockfile: str | None,
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
    from .._hub import AsyncHub

    with errors_as_exit():
        wanted = _read_handles(handles, from_file)
        if not wanted and lockfile:
            wanted = sorted(read_lock(lockfile))
    if not wanted:
        raise click.UsageError("no handles given (pass HANDLE... or --from-file FILE)")
    with errors_as_exit():
        # The one config: this process's hub and its workers are made from it as it is.
        config = _config.HubConfig.from_env(
            cache_dir=cache_dir,
            offline=True if offline else None,
            max_concurrency=jobs,
            connections=_count_or_auto(connections),
            lockfile=lockfile,
        )
    callback, display = progress_callback(quiet)  # starts no thread before start()
    # Worker processes are forked now, before any thread or event loop: they start
    # in milliseconds where a new interpreter takes ~0.25 s (_workers). prefetch
    # hands them work, or ends them when it keeps everything in this process.
    workers = fork_workers(config, len(set(wanted)), processes)

    async def fetch() -> Sequence[Path | HubError]:
        # From the config as it is: keywords would be read again, the environment
        # filling a None (a lock file turned off with '' would come back).
        async with AsyncHub.from_config(config, callback) as hub:
            return await hub.prefetch(
                wanted,
                return_exceptions=True,
                processes=workers or ("auto" if processes is None else processes),
            )

    try:
        with errors_as_exit(), showing(display):
            results = run(fetch)
    finally:
        if workers:
            from .. import _workers

            _workers.release()
    failed = [(h, r) for h, r in zip(wanted, results, strict=True) if isinstance(r, HubError)]
    distinct = len(set(wanted))
    failed_distinct = len({h for h, _ in failed})
    if as_json:
        emit_json(
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


def _count_or_auto(text: str | None) -> Any:
    """``--connections``: a number as an int, anything else as given (the config checks it)."""
    return int(text) if text is not None and text.strip().isdecimal() else text


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@click.command("resolve")
@click.argument("handle")
@cache_dir_option
@connections_option
@offline_option.with_help("Use the cache only; fail if it is missing.")
@quiet_option
@json_option
def resolve_command(
    handle: str,
    cache_dir: Path | None,
    connections: str | None,
    offline: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Fetch HANDLE into the cache if needed and print its local path."""
    from .._hub import AsyncHub

    callback, display = progress_callback(quiet)

    async def fetch() -> Path:
        async with AsyncHub(
            cache_dir=cache_dir,
            offline=True if offline else None,
            connections=_count_or_auto(connections),
            progress=callback,
        ) as hub:
            return await hub.resolve(handle)

    with errors_as_exit(), showing(display):
        path = run(fetch)
    if as_json:
        emit_json({"handle": handle, "path": str(path)})
    else:
        click.echo(str(path))


# -- lock / mirror ---------------------------------------------------------------------


@click.command("lock")
@click.argument("handles", nargs=-1, metavar="HANDLE...")
@cache_dir_option
@from_file_option
@quiet_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Write the lock file here instead of stdout: all of it at once (a temp file "
        "beside it, renamed), and only if every handle was pinned."
    ),
)
def lock_command(
    handles: tuple[str, ...],
    cache_dir: Path | None,
    from_file: IO[str] | None,
    quiet: bool,
    output: Path | None,
) -> None:
    """Print a lock file pinning each HANDLE: its archive's sha256 and size, its content digest.

    The digests are the origin's, computed while its bytes stream in: what the
    cache holds without them, or holds from a mirror, is fetched again from the
    origin (mirrors are not used), and a file changed in the cache since does
    not change them. Save it with -o asynchub.lock (a shell's '>' leaves an
    empty file when the command fails) and pass it as AsyncHub(lockfile=...)
    or 'asynchub prefetch --lockfile'.
    """
    from .._hub import AsyncHub
    from .._integrity import write_lock

    wanted = _read_handles(handles, from_file)
    if not wanted:
        raise click.UsageError("no handles given (pass HANDLE... or --from-file FILE)")
    callback, display = progress_callback(quiet)

    async def pin() -> list[LockEntry]:
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

    with errors_as_exit(), showing(display):
        entries = _run_hub_errors(pin)
    if output is None:
        click.echo(lock_text(entries), nl=False)
        return
    with errors_as_exit():
        try:
            write_lock(output, entries)
        except OSError as exc:
            raise HubError(
                f"cannot write the lock file {output}: {exc.strerror or exc}; nothing was written"
            ) from exc


@click.group("mirror")
def mirror_group() -> None:
    """Keep copies of modules where a fleet fetches them first (AsyncHub(mirrors=...))."""


@mirror_group.command("push")
@click.argument("mirror")
@click.argument("handles", nargs=-1, required=True, metavar="HANDLE...")
@cache_dir_option
@quiet_option
@json_option
def mirror_push(
    mirror: str, handles: tuple[str, ...], cache_dir: Path | None, quiet: bool, as_json: bool
) -> None:
    """Upload each HANDLE's cached module to MIRROR as <cache key>.tar.gz (packed reproducibly).

    MIRROR is s3://bucket[/prefix], gs://bucket[/prefix] or a local directory.
    HANDLEs are http(s) URLs (mirrors stand in for those). What is pushed is
    the origin's module: a handle not cached from its origin with its digests
    (or cached from a mirror) is fetched from the origin first, and a cached
    copy whose files changed since it was fetched is fetched again.
    """
    from .._hub import AsyncHub
    from .._sources import mirrors as _mirrors

    with errors_as_exit():
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
    callback, display = progress_callback(quiet)

    async def push() -> list[tuple[str, str]]:
        pushed = []
        # The origin's bytes only: no mirror, and no lock file from the environment
        # (consumers check theirs against what is pushed).
        async with AsyncHub(cache_dir=cache_dir, progress=callback, mirrors=[], lockfile="") as hub:
            for handle in dict.fromkeys(handles):
                path, _ = await hub.origin_entry(handle, verify=True)
                where = await _mirrors.push(mirror, path, key_of(handle), hub.object_stores)
                pushed.append((handle, where))
        return pushed

    with errors_as_exit(), showing(display):
        pushed = _run_hub_errors(push)
    if as_json:
        emit_json({"mirror": mirror, "pushed": [{"handle": h, "to": w} for h, w in pushed]})
    else:
        for handle, where in pushed:
            click.echo(f"{where}\t{handle}")


def _run_hub_errors(func: Callable[[], Awaitable[_T]]) -> _T:
    """:func:`~.common.run`, with a lone HubError out of a task group raised as itself."""
    try:
        return run(func)
    except BaseExceptionGroup as group:
        # The loop has finished: leaves() with its cancellations (cancelled=False needs a loop).
        errors = [e for e in leaves(group) if isinstance(e, HubError)]
        if errors:
            raise errors[0] from group
        raise
