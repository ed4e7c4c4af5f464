"""Where the pipeline's progress goes: a sink over the hub's callback (or nowhere)."""

from __future__ import annotations

from typing import Any

from .._handles import ParsedHandle
from .._progress import ProgressEvent, ProgressKind
from .._sources import Transfer
from .._types import ProgressCallback

__all__ = ["Events"]


class Events:
    """Progress events for one hub; cheap when nobody listens."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    def emit(self, kind: ProgressKind, parsed: ParsedHandle, **fields: Any) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(kind=kind, handle=parsed.text, **fields))

    def bytes(self, parsed: ParsedHandle, transfer: Transfer) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(
                    ProgressKind.DOWNLOADING,
                    parsed.text,
                    done=transfer.received,
                    total=transfer.total,
                )
            )
