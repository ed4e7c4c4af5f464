"""The ``cache`` commands: ``path``, ``ls``, ``rm``, ``prune`` and ``verify``.

They ask the store (``asynchub._store.admin``) and run no event loop. With
``--json`` they print machine-readable JSON (keys documented in docs/caching.md).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from .._config import default_cache_dir
from .._display import format_bytes
from .._store import admin as tools
from .common import (
    cache_dir_option,
    dry_run_option,
    emit_json,
    errors_as_exit,
    json_option,
    parse_duration,
)

__all__ = ["cache_group"]


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


@click.group("cache")
def cache_group() -> None:
    """Inspect and tidy the module cache (shared with tensorflow_hub)."""


def _dir(cache_dir: Path | None) -> Path:
    return cache_dir if cache_dir is not None else default_cache_dir()


@cache_group.command("path")
@cache_dir_option
@json_option
def cache_path(cache_dir: Path | None, as_json: bool) -> None:
    """Print the cache dir in use (it need not exist yet)."""
    path = _dir(cache_dir)
    if as_json:
        emit_json({"cache_dir": str(path), "exists": path.is_dir()})
    else:
        click.echo(str(path))


@cache_group.command("ls")
@cache_dir_option
@json_option
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List the entries: key, size, when fetched, status, handle."""
    root = _dir(cache_dir)
    with errors_as_exit():
        entries = tools.list_entries(root)
    if as_json:
        emit_json({"cache_dir": str(root), "entries": [e.to_json() for e in entries]})
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
        emit_json({"dry_run": dry_run, "removed": [r.to_json() for r in removals], "bytes": total})
        return
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        click.echo(f"{verb} {r.kind:10} {r.path}  ({_human(r.size)}; {r.reason})")
    click.echo(f"{verb} {len(removals)} paths, {_human(total)}", err=True)


@cache_group.command("rm")
@click.argument("handle_or_key", metavar="HANDLE|KEY")
@cache_dir_option
@dry_run_option
@json_option
def cache_rm(handle_or_key: str, cache_dir: Path | None, dry_run: bool, as_json: bool) -> None:
    """Remove one entry, named by its handle or its key (refused while it downloads)."""
    with errors_as_exit():
        removals = tools.remove(_dir(cache_dir), handle_or_key, dry_run=dry_run)
    _print_removals(removals, dry_run, as_json)


@cache_group.command("prune")
@cache_dir_option
@click.option(
    "--older-than",
    metavar="DURATION",
    default=None,
    callback=_duration_option,
    help="Also remove entries fetched longer ago than this (30d, 12h, 90m, 2w).",
)
@click.option("--incomplete", is_flag=True, help="Also remove entries that are not complete.")
@dry_run_option
@json_option
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
    with errors_as_exit():
        removals = tools.prune(
            _dir(cache_dir), older_than=older_than, incomplete=incomplete, dry_run=dry_run
        )
    _print_removals(removals, dry_run, as_json)


@cache_group.command("verify")
@cache_dir_option
@click.option(
    "--digests",
    is_flag=True,
    help=(
        "Also read every file and compare its sha256 with the one recorded when it was "
        "written (entries fetched with file_digests=True or ASYNCHUB_FILE_DIGESTS=1, "
        "and s3:// / gs:// prefixes)."
    ),
)
@json_option
def cache_verify(cache_dir: Path | None, digests: bool, as_json: bool) -> None:
    """Check every entry against its completeness record; exit 1 if any is incomplete."""
    root = _dir(cache_dir)
    with errors_as_exit():
        checks = tools.verify(root, digests=digests)
    bad = [c for c in checks if not c.complete]
    if as_json:
        emit_json({"cache_dir": str(root), "ok": not bad, "entries": [c.to_json() for c in checks]})
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
