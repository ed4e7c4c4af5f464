"""The commands of ``asynchub``; ``asynchub.cli`` puts :data:`COMMANDS` into its click group.

- ``common``: every option more than one command takes (declared once), the one
  error printer (``errors_as_exit``: ``error: <message on one line>`` on stderr,
  exit status 1), ``run`` (the event loop, with its Ctrl-C handling), the progress
  display and ``parse_duration``;
- ``fetch``: ``prefetch``, ``resolve``, ``lock`` and ``mirror push``, and
  ``fork_workers`` (prefetch's worker processes, forked before any thread or loop);
- ``cache``: ``cache path``, ``ls``, ``rm``, ``prune`` and ``verify``;
- ``create``: ``pack``;
- ``serve``: ``serve``.

Heavy parts (the hub, the server, uvicorn, TensorFlow) are imported inside the
commands, so ``asynchub --help`` stays fast. Nothing below this package imports it.
"""

from __future__ import annotations

import click

from .cache import cache_group
from .common import parse_duration
from .create import pack
from .fetch import fork_workers, lock_command, mirror_group, prefetch_command, resolve_command
from .serve import serve

__all__ = ["COMMANDS", "fork_workers", "parse_duration"]

#: The commands ``asynchub.cli`` registers into its group, in this order.
COMMANDS: list[click.Command] = [
    pack,
    serve,
    prefetch_command,
    resolve_command,
    lock_command,
    mirror_group,
    cache_group,
]
