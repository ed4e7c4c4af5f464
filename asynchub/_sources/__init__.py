"""Where archives' bytes come from: one small protocol, one module per kind of source.

``net`` is the hub's HTTP transport; ``mirrors`` says where a handle's archive
lies at a mirror (and pushes one there).
"""

from . import mirrors, net
from .base import RangedSource, RangesRefused, Retry, Source, Split, Transfer
from .file import FileSource
from .http import HttpSource
from .objstore import ObjectPrefix, ObjectSource, ObjectStores

__all__ = [
    "FileSource",
    "HttpSource",
    "ObjectPrefix",
    "ObjectSource",
    "ObjectStores",
    "RangedSource",
    "RangesRefused",
    "Retry",
    "Source",
    "Split",
    "Transfer",
    "mirrors",
    "net",
]
