"""The sync facade: plain calls, inside a running loop, many threads, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

import asynchub
from asynchub import Hub, HubClosedError
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server


@pytest.fixture
def url(server: Server, tmp_path: Path) -> str:
    return server.add("/m", body=tar_bytes(make_module(tmp_path / "src")), delay=0.2)


def test_hub_resolves_in_a_plain_script(url: str, cache_dir: Path, tmp_path: Path) -> None:
    with Hub(cache_dir=cache_dir) as hub:
        path = hub.resolve(url)
        assert hub.resolve(url) == path
    assert tree(path) == tree(tmp_path / "src")
    with pytest.raises(HubClosedError):
        hub.resolve(url)


def test_module_level_resolve_uses_the_environment(url: str, cache_dir: Path) -> None:
    path = asynchub.resolve(url)
    assert path.parent == cache_dir


def test_sync_call_inside_a_running_event_loop(url: str, cache_dir: Path) -> None:
    async def notebook_cell() -> Path:
        # What a Jupyter cell does: sync library code while the loop runs.
        return asynchub.resolve(url)

    path = anyio.run(notebook_cell)
    assert path.parent == cache_dir
    assert (path / "saved_model.pb").is_file()


def test_many_threads_share_one_download(url: str, server: Server, cache_dir: Path) -> None:
    with Hub(cache_dir=cache_dir) as hub, ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: hub.resolve(url), range(16)))
    assert len(set(paths)) == 1
    assert len(server.gets("/m")) == 1


def test_errors_cross_the_portal_unchanged(server: Server, cache_dir: Path) -> None:
    missing = server.add("/missing", status=404)
    with Hub(cache_dir=cache_dir) as hub, pytest.raises(asynchub.HTTPStatusError) as ei:
        hub.resolve(missing)
    assert ei.value.status == 404


@pytest.mark.anyio
async def test_async_module_helpers(url: str, cache_dir: Path) -> None:
    path = await asynchub.aresolve(url)
    assert path.parent == cache_dir
    assert await asynchub.aprefetch([url, url]) == [path, path]


_INTERRUPTED = textwrap.dedent(
    """
    import sys, asynchub
    print("start", flush=True)
    try:
        asynchub.resolve(sys.argv[1])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)
    """
)


def test_ctrl_c_leaves_no_tmp_dir_or_lock(server: Server, cache_dir: Path, tmp_path: Path) -> None:
    slow = server.add(
        "/slow",
        body=tar_bytes(make_module(tmp_path / "big", weights=3_000_000)),
        chunk=8192,
        throttle=0.01,
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TFHUB_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not (cache_dir.exists() and any(p.suffix == ".tmp" for p in cache_dir.iterdir())):
        assert time.monotonic() < deadline, proc.communicate(timeout=5)
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, (out, err)
    assert "interrupted" in out
    assert sorted(p.name for p in cache_dir.iterdir()) == []


def test_sync_cache_hit_still_notices_a_deleted_file(
    url: str, server: Server, cache_dir: Path
) -> None:
    with Hub(cache_dir=cache_dir) as hub:
        path = hub.resolve(url)
        assert hub.resolve(url) == path  # answered in this thread
        (path / "variables" / "variables.index").unlink()
        assert hub.resolve(url) == path
        assert (path / "variables" / "variables.index").is_file()
    assert len(server.gets("/m")) == 2
