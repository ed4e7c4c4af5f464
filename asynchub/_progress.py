"""Progress events: what the core reports while it resolves handles."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProgressEvent", "ProgressKind", "silent"]


class ProgressKind(enum.Enum):
    QUEUED = "queued"  #: waiting for a download slot
    DOWNLOADING = "downloading"  #: bytes arrive; ``done``/``total`` say how many
    EXTRACTING = "extracting"  #: the body is in; the last members are being written
    RETRYING = "retrying"  #: an attempt failed; ``error`` says why, ``attempt`` is the next one
    DONE = "done"  #: the module is in the cache at ``path``
    CACHED = "cached"  #: already in the cache, nothing fetched
    FAILED = "failed"  #: gave up; ``error`` is the exception raised


@dataclass(frozen=True)
class ProgressEvent:
    kind: ProgressKind
    handle: str
    done: int = 0  #: bytes received so far (compressed, as on the wire)
    total: int | None = None  #: bytes expected, when the server said
    attempt: int = 0
    path: Path | None = None
    error: BaseException | None = None


def silent(event: ProgressEvent) -> None:
    """A progress callback that drops every event.

    Unlike ``progress=None`` it keeps ``TFHUB_DOWNLOAD_PROGRESS`` from starting a
    display, and worker processes are told to send no events at all.
    """
