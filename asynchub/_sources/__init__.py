"""Where archives' bytes come from: one small protocol, one module per kind of source."""

from .base import Retry, Source, Transfer
from .file import FileSource
from .http import HttpSource

__all__ = ["FileSource", "HttpSource", "Retry", "Source", "Transfer"]
