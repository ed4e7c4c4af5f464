"""Where asynchub's own processes start: the ``asynchub`` script and the worker processes.

Both run on asyncio and never use two things their imports would load: httpx's
own command line (``import httpx`` loads click, rich and pygments for it when
they are installed) and trio (httpcore imports it when it is installed). Both
are refused before anything is imported (a refused import is an ImportError,
which both importers expect), which saves 0.1-0.2 s of every start. Only
processes asynchub starts do this: importing asynchub elsewhere changes nothing.
"""

from __future__ import annotations

import sys

__all__ = ["UNUSED", "main", "refuse_unused", "worker"]

UNUSED = ("httpx._main", "trio")


def refuse_unused() -> None:
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    """The ``asynchub`` command (``python -m asynchub`` too)."""
    refuse_unused()
    from .cli import main as cli

    cli(prog_name="asynchub")


def worker() -> None:
    """A spawned worker process of ``prefetch(..., processes=N)`` (see ``_workers``).

    Here, above the hub, the worker package is handed the hub class: it sits
    below the hub and never imports it.
    """
    refuse_unused()
    from ._hub import AsyncHub
    from ._workers import child

    child.main(AsyncHub.from_config)
