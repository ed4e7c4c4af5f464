from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._httpserver import Server, running


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server() -> Iterator[Server]:
    with running() as srv:
        yield srv


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir, also set as TFHUB_CACHE_DIR so nothing touches the real one."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(path))
    monkeypatch.delenv("ASYNCHUB_OFFLINE", raising=False)
    return path
