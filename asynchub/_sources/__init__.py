"""Where archives' bytes come from: one small protocol, one module per kind of source."""

from .base import Retry, Source, Transfer
from .file import FileSource
from .http import HttpSource
from .objstore import ObjectPrefix, ObjectSource, ObjectStores

__all__ = [
    "FileSource",
    "HttpSource",
    "ObjectPrefix",
    "ObjectSource",
    "ObjectStores",
    "Retry",
    "Source",
    "Transfer",
]
