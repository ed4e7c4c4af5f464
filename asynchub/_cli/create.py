"""The ``pack`` command: a module directory into a reproducible tar.gz archive."""

from __future__ import annotations

from pathlib import Path

import click

from .common import errors_as_exit

__all__ = ["pack"]


@click.command()
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def pack(src_dir: Path, out: Path) -> None:
    """Pack the module directory SRC_DIR into the tar.gz archive OUT.

    The same directory always gives byte-identical archives (sorted members, owner 0,
    fixed mtimes and modes). Serve the archive as NAME/VERSION.tar.gz, or anywhere a
    hub handle can point.
    """
    from .._pack import pack as pack_dir

    with errors_as_exit():
        archive = pack_dir(src_dir, out)
    click.echo(f"{out} ({archive.stat().st_size} bytes)")
