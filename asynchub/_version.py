"""The package's version, on the ground floor: the command line and the servers report it."""

__version__ = "0.1.0"
