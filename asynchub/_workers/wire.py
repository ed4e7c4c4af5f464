"""The worker protocol's values on the wire: JSON lines of config, events, results and errors.

One JSON value a line, UTF-8:

* parent -> child stdin: first ``{"config": HubConfig.to_json(), "events": bool}``,
  then one handle (a string) per line, sent when the child has a free slot, then
  ``{"end": true}``: no more handles. The parent keeps stdin open until the child
  has exited, so EOF before the child is done means the parent is gone (killed,
  or stopping the child): the child stops at once and cleans up. EOF before the
  config line: a forked child no prefetch took, which exits with nothing to do.
* child -> parent stdout: ``{"event": kind, "handle", "done", "total", "attempt",
  "path", "error"}`` progress events, and ``{"result": handle, "path": p}`` or
  ``{"result": handle, "error": {"type", "message", "handle", "url", "status"}}``.

Pure functions: no I/O here, so both sides and ``asynchub.ray`` share them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import errors
from .._config import HubConfig
from .._progress import ProgressEvent, ProgressKind
from ..errors import DownloadError, HTTPStatusError, HubError

__all__ = [
    "END_LINE",
    "config_line",
    "error_from_json",
    "error_to_json",
    "event_from_json",
    "event_to_json",
    "is_end",
    "read_config",
]

#: The parent's orderly "no more handles", after the last handle line.
END_LINE = b'{"end": true}\n'


def config_line(config: HubConfig, max_concurrency: int, *, events: bool) -> bytes:
    """The first line a child reads: the parent's whole config, its share of the
    concurrency, and whether the parent wants progress events."""
    # The parent draws any progress display: the child only sends events.
    mine = dataclasses.replace(config, max_concurrency=max_concurrency, progress=False)
    return (json.dumps({"config": mine.to_json(), "events": events}) + "\n").encode()


def read_config(line: bytes) -> tuple[HubConfig, bool]:
    """:func:`config_line`'s config and events flag, read back."""
    data = json.loads(line)
    return HubConfig.from_json(data["config"]), bool(data["events"])


def is_end(message: object) -> bool:
    """Whether a line the child read (JSON-decoded) is :data:`END_LINE` rather than a handle."""
    return isinstance(message, dict) and message.get("end") is True


def error_to_json(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "hub_error": isinstance(exc, HubError),
        "handle": getattr(exc, "handle", None),
        "url": getattr(exc, "url", None),
        "status": getattr(exc, "status", None),
    }


def error_from_json(data: Mapping[str, Any]) -> HubError:
    """The same asynchub.errors class, message, handle, url and status; else a HubError."""
    cls: Any = getattr(errors, str(data.get("type")), None)
    message = str(data.get("message", ""))
    handle = data.get("handle")
    if not (isinstance(cls, type) and issubclass(cls, HubError)) or cls is errors.PrefetchError:
        cls = HubError
        if not data.get("hub_error"):
            message = f"{data.get('type')}: {message}"
    url = data.get("url")
    error: HubError
    if issubclass(cls, HTTPStatusError):
        error = cls(message, handle=handle, url=url, status=int(data.get("status") or 0))
    elif issubclass(cls, DownloadError):
        error = cls(message, handle=handle, url=url)
    else:
        error = cls(message, handle=handle)
    return error


def event_to_json(event: ProgressEvent) -> dict[str, Any]:
    return {
        "event": event.kind.value,
        "handle": event.handle,
        "done": event.done,
        "total": event.total,
        "attempt": event.attempt,
        "path": None if event.path is None else os.fspath(event.path),
        "error": None if event.error is None else error_to_json(event.error),
    }


def event_from_json(data: Mapping[str, Any]) -> ProgressEvent:
    error = data.get("error")
    path = data.get("path")
    return ProgressEvent(
        kind=ProgressKind(data["event"]),
        handle=str(data["handle"]),
        done=int(data.get("done") or 0),
        total=data.get("total"),
        attempt=int(data.get("attempt") or 0),
        path=None if path is None else Path(path),
        error=None if error is None else error_from_json(error),
    )
