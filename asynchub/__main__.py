"""``python -m asynchub``: the command line, where the ``asynchub`` script is not on PATH."""

from .cli import main

main(prog_name="asynchub")
