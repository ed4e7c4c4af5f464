"""``python -m asynchub``: the command line, where the ``asynchub`` script is not on PATH."""

from ._launch import main

main()
