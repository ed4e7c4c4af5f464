"""The ``asynchub`` command line: prefetch, resolve, lock, mirror, cache, pack and serve.

This module is the click group, :func:`main` (the ``asynchub`` script runs it
through ``asynchub._launch``); the commands live in ``asynchub._cli``. Heavy parts
(the hub, the server, uvicorn, TensorFlow) are imported inside the commands, so
``asynchub --help`` stays fast. Failures exit with status 1 and print a one-line
``error: ...`` on stderr, an OSError too (its own output's included: a closed
stdout, a broken pipe, a full disk); Ctrl-C exits 130 and SIGTERM 143, after
removing what a download left half-done. ``serve`` drains instead: the requests in
flight finish, then it exits 0 (1 if ``--drain-timeout`` cut some off).
"""

from __future__ import annotations

from typing import Any

from .errors import MissingDependencyError

try:
    import click
except ImportError as exc:  # pragma: no cover - exercised without the cli extra only
    raise MissingDependencyError(
        f'the asynchub command line needs click ({exc}): pip install "asynchub[cli]"'
    ) from exc

from ._cli import COMMANDS
from ._cli.common import standard_streams
from ._version import __version__

__all__ = ["main"]


class _Main(click.Group):
    """The group, run so that every OSError is one ``error:`` line (``standard_streams``)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with standard_streams():
            return super().main(*args, **kwargs)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message="%(prog)s %(version)s")
def main() -> None:
    """Create, host and load TensorFlow Hub-style modules."""


for _command in COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main(prog_name="asynchub")
