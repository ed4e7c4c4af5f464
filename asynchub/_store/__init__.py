"""The cache store: layout, locks, and one owner of an entry's whole life."""

from .layout import Entry, Record, SourceStamp
from .locks import LockView, Verdict, verdict
from .store import Accept, Claim, Store, cache_error

__all__ = [
    "Accept",
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
