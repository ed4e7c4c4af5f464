"""The sync facade: plain calls, inside a running loop, many threads, Ctrl-C."""

from __future__ import annotations

import gc
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

import asynchub
from asynchub import Hub, HubClosedError, _sync
from asynchub._config import HubConfig
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


# -- the async twins: one hub per event loop ------------------------------------


class _CountingHub(asynchub.AsyncHub):
    made: ClassVar[list[asynchub.AsyncHub]] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.made.append(self)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[asynchub.AsyncHub]:
    made: ClassVar[list[asynchub.AsyncHub]] = []
    monkeypatch.setattr(_CountingHub, "made", made)
    monkeypatch.setattr(_sync, "AsyncHub", _CountingHub)
    return made


async def _eight(url: str, **options: Any) -> list[Path]:
    paths: list[Path] = []

    async def one() -> None:
        paths.append(await asynchub.aresolve(url, **options))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    return paths


@pytest.mark.anyio
async def test_concurrent_aresolve_share_one_hub_and_one_download(
    server: Server, cache_dir: Path, tmp_path: Path, counting: list[asynchub.AsyncHub]
) -> None:
    src = make_module(tmp_path / "eight")
    url = server.add("/eight", body=tar_bytes(src), delay=0.3)
    started = time.monotonic()
    paths = await _eight(url)
    elapsed = time.monotonic() - started
    assert len(paths) == 8 and len(set(paths)) == 1
    assert tree(paths[0]) == tree(src)
    assert len(server.gets("/eight")) == 1
    # One hub for the loop, so its single-flight joined the eight: nobody waited
    # on the lock file (which is polled, up to a second apart).
    assert len(counting) == 1
    assert elapsed < 5.0
    assert await asynchub.aresolve(url) == paths[0]
    assert await asynchub.aprefetch([url, url]) == [paths[0], paths[0]]
    assert len(counting) == 1
    # Worker processes work from the loop's hub too (it keeps no idle connections).
    assert await asynchub.aprefetch([url], processes=2) == [paths[0]]
    assert len(counting) == 1 and not counting[0].in_process_only


@pytest.mark.anyio
async def test_explicit_options_share_a_hub_per_option_set(
    server: Server, cache_dir: Path, tmp_path: Path, counting: list[asynchub.AsyncHub]
) -> None:
    url = server.add("/opts", body=tar_bytes(make_module(tmp_path / "src")), delay=0.3)
    other = tmp_path / "other-cache"
    paths = await _eight(url, cache_dir=other, headers={"x-token": "a"})
    assert len(set(paths)) == 1 and paths[0].parent == other
    assert len(server.gets("/opts")) == 1
    assert len(counting) == 1
    # Options equal to the defaults (None) are the default hub; other values another.
    assert (await asynchub.aresolve(url, cache_dir=None)).parent == cache_dir
    assert await asynchub.aresolve(url, cache_dir=other, headers={"x-token": "a"}) == paths[0]
    assert len(counting) == 2


@pytest.mark.anyio
async def test_progress_or_transport_get_a_hub_of_their_own(
    server: Server, cache_dir: Path, tmp_path: Path, counting: list[asynchub.AsyncHub]
) -> None:
    url = server.add("/own", body=tar_bytes(make_module(tmp_path / "src")))
    events: list[asynchub.ProgressEvent] = []
    path = await asynchub.aresolve(url, progress=events.append)
    assert events and events[-1].kind is asynchub.ProgressKind.DONE
    assert await asynchub.aresolve(url, progress=events.append) == path
    assert events[-1].kind is asynchub.ProgressKind.CACHED
    assert len(counting) == 2
    assert all(hub._client is None for hub in counting)  # closed after each call


@pytest.mark.anyio
async def test_the_loop_hub_follows_the_environment(
    url: str, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await asynchub.aresolve(url)).parent == cache_dir
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "moved"))
    assert (await asynchub.aresolve(url)).parent == tmp_path / "moved"
    monkeypatch.setenv("ASYNCHUB_OFFLINE", "1")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(asynchub.OfflineError):
        await asynchub.aresolve(url)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_each_event_loop_gets_its_own_hub_and_leaves_nothing_open(
    backend: str, server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    urls = [server.add(f"/r{i}", body=tar_bytes(make_module(tmp_path / f"s{i}"))) for i in range(2)]
    hubs: list[weakref.ref[asynchub.AsyncHub]] = []

    async def main(url: str) -> Path:
        path = await asynchub.aresolve(url)
        assert await asynchub.aresolve(url) == path
        hubs.append(weakref.ref(await _sync._loop_hub({})))
        return path

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = anyio.run(main, urls[0], backend=backend)
        second = anyio.run(main, urls[1], backend=backend)  # a fresh loop: a fresh hub
        assert first != second and first.parent == second.parent == cache_dir
        gc.collect()
    # Nobody closes a loop's hub: it must hold nothing that complains when collected.
    assert [str(w.message) for w in caught] == []
    # A worker thread of the finished loop may still be on its way out (seen once under
    # load in a full run): give it a few seconds, then the hubs must be gone.
    deadline = time.monotonic() + 5
    while any(ref() is not None for ref in hubs) and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert [ref() for ref in hubs] == [None, None]


def test_hub_takes_the_options_of_asynchub() -> None:
    """One option list: the typed keywords are the config's options and the runtime objects."""
    from asynchub._config import RUNTIME_OPTIONS, HubOptions

    typed = set(HubOptions.__annotations__)
    assert typed == set(HubConfig.options()) | RUNTIME_OPTIONS
    assert {"progress", "transport", "keep_alive"} == RUNTIME_OPTIONS
    # Every keyword-taking entry point takes exactly those, through **Unpack[HubOptions].
    for func in (asynchub.AsyncHub.__init__, Hub.__init__, asynchub.aresolve, asynchub.aload):
        params = inspect.signature(func).parameters.values()
        (var,) = [p for p in params if p.kind is p.VAR_KEYWORD]
        assert var.annotation == "Unpack[HubOptions]", func
    with pytest.raises(TypeError, match="unknown hub option"):
        asynchub.AsyncHub(cache_dir="/x", mirror="s3://b")  # type: ignore[call-arg]
    with Hub(cache_dir="/nonexistent/x", retries=1, offline=True) as hub:
        assert isinstance(hub.config, HubConfig)
        assert hub.cache_dir == Path("/nonexistent/x")
        assert hub.config.offline and hub.config.retries.total == 1
