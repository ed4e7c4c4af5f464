"""The cache store: layout, locks, and one owner of an entry's whole life."""

from ._layout import Entry, Record, SourceStamp
from .locks import LockView, Verdict, verdict
from .store import Claim, Store, cache_error

__all__ = [
    "Claim",
    "Entry",
    "LockView",
    "Record",
    "SourceStamp",
    "Store",
    "Verdict",
    "cache_error",
    "verdict",
]
