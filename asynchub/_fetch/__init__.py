"""The download pipeline: what happens between a claimed cache entry and its commit.

:class:`Fetcher` picks the sources (mirrors, then the origin), runs attempts
with back-off, hands the bytes to the extraction thread, checks the pin and
commits through the store; a large archive from a slow origin is fetched as
byte ranges over several connections and handed on in order (:mod:`.ranged`).
It is given what it uses and never imports the hub.
"""

from .events import Events
from .pipeline import Fetcher

__all__ = ["Events", "Fetcher"]
