"""The sync facade after fork(): a child starts afresh instead of waiting on a thread it lacks.

multiprocessing's default start method on Linux forks, so data-loader workers
and the like inherit a hub whose event loop thread was not copied.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

import asynchub
from asynchub import Hub, _sync
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()"),
    # Python 3.12+ warns when a process with threads forks (the test server's, the
    # portal's): that such a fork is safe for asynchub is what these tests check.
    pytest.mark.filterwarnings(
        r"ignore:.*use of fork\(\) may lead to deadlocks:DeprecationWarning"
    ),
]

_CHILD_TIMEOUT = 30.0


def _run_forked(how: str, target: Callable[[], None]) -> None:
    """Run ``target`` in a forked child; fail if it fails or is still running after a while."""
    if how == "multiprocessing":
        proc = multiprocessing.get_context("fork").Process(target=target)
        proc.start()
        proc.join(_CHILD_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
            pytest.fail(f"the child hung for {_CHILD_TIMEOUT:g}s")
        assert proc.exitcode == 0
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            target()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + _CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child hung for {_CHILD_TIMEOUT:g}s")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture(params=["multiprocessing", "os.fork"])
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    return [make_module(tmp_path / f"src{i}", seed=i) for i in range(3)]


@pytest.fixture
def urls(server: Server, sources: list[Path]) -> list[str]:
    return [server.add(f"/m{i}", body=tar_bytes(src)) for i, src in enumerate(sources)]


def test_module_level_resolve_works_in_a_forked_child(
    how: str, urls: list[str], sources: list[Path], server: Server, cache_dir: Path
) -> None:
    cached = asynchub.resolve(urls[0])  # a download: the default hub's loop thread runs
    assert asynchub.resolve(urls[0]) == cached  # and a cache hit

    def child() -> None:
        assert asynchub.resolve(urls[0]) == cached
        path = asynchub.resolve(urls[1])
        assert path.parent == cache_dir
        assert tree(path) == tree(sources[1])
        assert asynchub.prefetch([urls[1], urls[0]]) == [path, cached]

    _run_forked(how, child)
    assert len(server.gets("/m1")) == 1  # the child downloaded it
    assert asynchub.resolve(urls[1]).is_dir()  # and the parent's hub still works
    assert tree(asynchub.resolve(urls[2])) == tree(sources[2])


def test_a_hub_of_ones_own_works_and_closes_in_a_forked_child(
    how: str, urls: list[str], sources: list[Path], tmp_path: Path
) -> None:
    with Hub(cache_dir=tmp_path / "own") as hub:
        cached = hub.resolve(urls[0])

        def child() -> None:
            assert hub.cache_dir == tmp_path / "own"
            assert hub.resolve(urls[0]) == cached
            assert tree(hub.resolve(urls[1])) == tree(sources[1])
            hub.close()
            with pytest.raises(asynchub.HubClosedError):
                hub.resolve(urls[2])

        _run_forked(how, child)
        # The child closed its copy, not the parent's hub.
        assert tree(hub.resolve(urls[2])) == tree(sources[2])


def test_locks_held_at_fork_time_do_not_hang_the_child(
    how: str, urls: list[str], sources: list[Path], cache_dir: Path
) -> None:
    asynchub.resolve(urls[0])
    hub = _sync.default_hub()
    # Another thread is in the middle of a call when the fork happens: the child
    # gets these locks held, by a thread it does not have.
    held = threading.Event()
    release = threading.Event()

    def busy() -> None:
        with _sync._default_lock, hub._lock:
            held.set()
            release.wait(_CHILD_TIMEOUT)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        assert held.wait(5)

        def child() -> None:
            assert tree(asynchub.resolve(urls[1])) == tree(sources[1])
            assert _sync.default_hub() is hub

        _run_forked(how, child)
    finally:
        release.set()
        thread.join()


_EXIT_AFTER_FORK = textwrap.dedent(
    """
    import os, sys, asynchub
    asynchub.resolve(sys.argv[1])
    pid = os.fork()
    if pid == 0:
        asynchub.resolve(sys.argv[2])
        sys.exit(0)  # a normal exit runs atexit, which closes the default hub
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_forked_child_exits_normally(urls: list[str], cache_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TFHUB_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXIT_AFTER_FORK, urls[0], urls[1]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=_CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"parent or child hung for {_CHILD_TIMEOUT:g}s")
    assert proc.returncode == 0, (out, err)
    assert (cache_dir / hashlib.sha1(urls[1].encode()).hexdigest()).is_dir()
