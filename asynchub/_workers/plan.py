"""How many worker processes pay for themselves: pure functions of the work and the cores."""

from __future__ import annotations

import os

__all__ = ["plan_forked", "plan_processes", "usable_cores"]


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
