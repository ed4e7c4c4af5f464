"""Batch prefetch: resolve many handles at once, collecting failures instead of stopping."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, cast, overload

import anyio

from ._types import Handle, Processes, ProgressCallback
from .errors import HubError, PrefetchError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._config import HubConfig
    from ._store import Store

__all__ = ["HubLike", "plan_forked", "plan_processes", "prefetch", "usable_cores"]


class HubLike(Protocol):
    """What prefetch and the worker processes need of a hub (an open AsyncHub)."""

    @property
    def config(self) -> HubConfig: ...
    @property
    def store(self) -> Store: ...
    @property
    def limiter(self) -> anyio.CapacityLimiter: ...
    @property
    def progress(self) -> ProgressCallback | None: ...
    @property
    def custom_transport(self) -> bool: ...
    async def resolve(self, handle: Handle) -> Path: ...
    async def lookup(self, handle: Handle) -> Path | None: ...


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
    if workers >= 2 and not hub.custom_transport:
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
                from . import _workers

                limit = min(
                    max_concurrency or hub.config.max_concurrency, int(hub.limiter.total_tokens)
                )
                tg.start_soon(
                    _workers.run,
                    hub,
                    remote,
                    workers,
                    limit,
                    limiter,
                    results,
                    name="prefetch workers",
                )
    except BaseExceptionGroup as group:
        _reraise(group)

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


#: What one worker process must have to pay for its start-up (~0.25 s: an
#: interpreter, httpx and anyio) and for a second event loop.
_CORES_PER_PROCESS = 2
_DOWNLOADS_PER_PROCESS = 2
_AUTO_MAX = 4


def plan_processes(downloads: int, cores: int, cap: int = _AUTO_MAX) -> int:
    """How many worker processes ``processes="auto"`` starts for ``downloads`` on ``cores``.

    0 means none: every download stays in this process. One process already
    uses up to about 1.6 cores (the event loop, and gunzip, hashing and writes
    in threads that release the GIL), so on 2 cores a second process only adds
    its start-up and contention: measured slower (benchmarks/README.md,
    "Prefetch"). A worker process is started for every 2 cores and every 2
    downloads, at most ``cap``, and only when that makes at least two: the
    archives' sizes are not known before their responses arrive, so their
    number stands in for the work.
    """
    count = min(cap, cores // _CORES_PER_PROCESS, downloads // _DOWNLOADS_PER_PROCESS)
    return count if count >= 2 else 0


def plan_forked(downloads: int, cores: int, jobs: int, cap: int = _AUTO_MAX) -> int:
    """How many worker processes the command line forks for ``downloads`` at ``-j jobs``.

    A forked child inherits the parent's imports and starts in milliseconds,
    so unlike a new interpreter it pays for itself on 2 cores: each process
    has a GIL of its own, and two of them keep both cores busy where one
    process keeps about 1.6 (benchmarks/README.md, "Prefetch"). One per core,
    each with at least 2 downloads and one of the ``jobs`` slots, at most
    ``cap``, and only when that makes at least two.
    """
    count = min(cap, cores, downloads // _DOWNLOADS_PER_PROCESS, jobs)
    return count if count >= 2 else 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


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


def _reraise(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise a lone bug as itself rather than wrapped; several stay grouped.

    The task group cancels the other tasks when one raises, so the group holds
    the real error plus cancellations, which are dropped here.
    """
    cancelled = anyio.get_cancelled_exc_class()
    real, _rest = group.split(lambda exc: not isinstance(exc, cancelled))
    if real is None:
        raise group
    leaves: list[BaseException] = []
    stack: list[BaseException] = [real]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1:
        raise leaves[0]
    raise real
