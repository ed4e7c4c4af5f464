from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._httpserver import Server, running
from tests._objstores import GcsServer, S3Server, fake_gcs_server, moto_server


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


# -- object stores: real servers on 127.0.0.1, one each per session (tests/_objstores.py) --


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    with fake_gcs_server() as srv:
        yield srv


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """moto's S3, with the standard AWS_* environment pointing at it (and nothing else of AWS)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def gcs(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch) -> GcsServer:
    """fake-gcs-server, with GOOGLE_* pointing at it (no credentials: it checks none)."""
    for name in list(os.environ):
        if name.startswith("GOOGLE_") or name == "STORAGE_EMULATOR_HOST":
            monkeypatch.delenv(name)
    for name, value in gcs_server.env().items():
        monkeypatch.setenv(name, value)
    return gcs_server


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the worker processes the library spawns during the test."""
    import anyio.abc

    from asynchub import _workers

    pids: list[int] = []
    spawn = _workers.parent._spawn

    async def counting() -> anyio.abc.Process:
        process = await spawn()
        pids.append(process.pid)
        return process

    monkeypatch.setattr(_workers.parent, "_spawn", counting)
    return pids
