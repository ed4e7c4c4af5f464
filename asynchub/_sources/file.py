"""Local archives (a path or a ``file://`` URL) as a source."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from ..errors import ArchiveError
from .base import OnResume, Transfer

__all__ = ["FileSource"]


class FileSource:
    retry_truncated = False

    def __init__(self, path: Path, *, handle: str, chunk_size: int) -> None:
        self.path = path
        self.where = str(path)
        self._handle = handle
        self._chunk_size = chunk_size

    async def stream(self, transfer: Transfer, on_resume: OnResume) -> AsyncIterator[bytes]:
        try:
            transfer.total = (await anyio.Path(self.path).stat()).st_size
            async with await anyio.open_file(self.path, "rb") as fh:
                while chunk := await fh.read(self._chunk_size):
                    transfer.received += len(chunk)
                    yield chunk
        except OSError as exc:
            raise ArchiveError(
                f"{self._handle}: cannot read {self.path}: {exc.strerror or exc}",
                handle=self._handle,
            ) from exc
