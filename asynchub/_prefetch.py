"""Batch prefetch: resolve many handles at once, collecting failures instead of stopping."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, cast, overload

import anyio

from ._types import Handle, Processes
from ._workers import HubLike, plan_processes, usable_cores
from .errors import HubError, PrefetchError, leaves

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["check_processes", "prefetch"]


_SHOWN = 5  # failed handles named in a PrefetchError's message; .exceptions holds them all


@overload
async def prefetch(
    hub: HubLike,
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = ...,
    return_exceptions: Literal[False] = ...,
    processes: Processes = ...,
) -> list[Path]: ...


@overload
async def prefetch(
    hub: HubLike,
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = ...,
    return_exceptions: bool,
    processes: Processes = ...,
) -> list[Path | HubError]: ...


async def prefetch(
    hub: HubLike,
    handles: Iterable[Handle],
    *,
    max_concurrency: int | None = None,
    return_exceptions: bool = False,
    processes: Processes = None,
) -> list[Path] | list[Path | HubError]:
    """Resolve every handle concurrently; return their paths in input order.

    Each distinct handle is resolved once. A HubError for one handle does not
    stop the others: when all have finished, a :class:`PrefetchError` holds one
    error per failed handle, or with ``return_exceptions=True`` the errors stand
    in the list in place of paths. Any other exception (a bug, misuse) cancels
    the rest and propagates. ``max_concurrency`` bounds this call's downloads;
    the hub's own limiter still bounds downloads across all calls.

    ``processes=N`` (N >= 2) spreads the handles that need a download over up
    to N worker processes (see ``_worker``); cached handles, local dirs and
    offline hubs stay in this process, as does everything when only one
    handle needs a download or the hub has a custom transport.
    ``processes="auto"`` takes N from :func:`plan_processes`.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    check_processes(processes)
    hub.limiter  # noqa: B018 - raises HubClosedError on a hub that is not open
    items = list(handles)
    # One task per distinct handle text: the cache key is the text, so "m" and
    # Path("m") are one module, and its failure is reported once.
    keys = [_dedupe_key(handle, index) for index, handle in enumerate(items)]
    distinct: dict[str, Handle] = {}
    for key, handle in zip(keys, items, strict=True):
        distinct.setdefault(key, handle)
    limiter = anyio.CapacityLimiter(max_concurrency) if max_concurrency else None
    results: dict[str, Path | HubError] = {}

    async def one(key: str, handle: Handle) -> None:
        try:
            # Hits skip this call's limiter, so they return at once even while
            # the slots are busy with downloads.
            if limiter is None or await _needs_no_download(hub, handle):
                results[key] = await hub.resolve(handle)
            else:
                async with limiter:
                    results[key] = await hub.resolve(handle)
        except HubError as exc:
            if exc.handle is None:
                exc.handle = key
            results[key] = exc

    remote: list[str] = []
    auto = processes == "auto"
    workers = 0
    if auto:
        # Every handle counted as a download: the most there can be.
        workers = plan_processes(len(distinct), usable_cores())
    elif isinstance(processes, int):
        workers = processes
    if workers >= 2 and not hub.in_process_only:
        remote = await _to_download(hub, distinct)
        if auto:
            workers = plan_processes(len(remote), usable_cores())
        if len(remote) < 2 or workers < 2:
            remote = []  # one download: a worker process would only add its start-up
    sent = set(remote)
    in_process = {key: handle for key, handle in distinct.items() if key not in sent}

    try:
        async with anyio.create_task_group() as tg:
            for key, handle in in_process.items():
                tg.start_soon(one, key, handle, name=f"prefetch {key}")
            if remote:
                from ._workers import run as run_workers

                limit = min(
                    max_concurrency or hub.config.max_concurrency, int(hub.limiter.total_tokens)
                )
                tg.start_soon(
                    run_workers,
                    hub,
                    remote,
                    workers,
                    limit,
                    limiter,
                    results,
                    name="prefetch workers",
                )
    except BaseExceptionGroup as group:
        # A lone bug as itself rather than wrapped (the others were only cancelled);
        # several stay grouped.
        real = leaves(group, cancelled=False)
        if len(real) == 1:
            raise real[0]  # noqa: B904 - the error keeps its own cause
        raise

    ordered = [results[key] for key in keys]
    # In input order, not completion order, so the report is the same every run.
    failed = [(key, r) for key in distinct if isinstance(r := results[key], HubError)]
    if return_exceptions:
        return ordered
    if failed:
        raise PrefetchError(_message(failed, len(distinct)), [error for _, error in failed])
    return cast(list[Path], ordered)


def check_processes(processes: Processes) -> None:
    if processes is None or processes == "auto":
        return
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise TypeError(f"processes must be an int, 'auto' or None, got {processes!r}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")


def _dedupe_key(handle: object, index: int) -> str:
    if isinstance(handle, (str, os.PathLike)):
        text = os.fspath(handle)
        if isinstance(text, str):
            return text
    # Not a handle at all: resolve() will say so; keep each one apart.
    return f"<handle #{index}: {handle!r}>"


async def _needs_no_download(hub: HubLike, handle: Handle) -> bool:
    """True when resolve() will not download: a local dir, a complete entry, or offline."""
    if hub.config.offline:
        return True
    return await hub.lookup(handle) is not None


async def _to_download(hub: HubLike, distinct: dict[str, Handle]) -> list[str]:
    """The keys of the handles a worker process should resolve: those that need a download."""
    if hub.config.offline:
        return []
    out = []
    for key, handle in distinct.items():
        if not isinstance(handle, (str, os.PathLike)) or key != os.fspath(handle):
            continue  # not a handle: resolve() in this process reports it
        try:
            if not await _needs_no_download(hub, handle):
                out.append(key)
        except HubError:
            continue  # the same: reported in this process
    return out


def _message(failed: list[tuple[str, HubError]], total: int) -> str:
    shown = ", ".join(f"{key} ({type(error).__name__})" for key, error in failed[:_SHOWN])
    more = f", and {len(failed) - _SHOWN} more" if len(failed) > _SHOWN else ""
    return f"{len(failed)} of {total} handles failed: {shown}{more}"
