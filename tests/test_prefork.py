"""Worker processes the command line forks before its event loop (``_workers.prefork``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from asynchub import _cli, _config, _workers
from asynchub._workers import plan_forked
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests.test_prefetch import key, leftovers

REPO = Path(__file__).resolve().parents[1]
CLI = "from asynchub.cli import main; main(prog_name='asynchub')"


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("modules")
    return [tar_bytes(make_module(root / f"m{i}", weights=20_000, seed=i)) for i in range(6)]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tar_bytes(make_module(tmp_path_factory.mktemp("big") / "big", weights=1_000_000))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with this checkout importable, its output captured."""
    return subprocess.run(
        [sys.executable, *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("downloads", "cores", "jobs", "expected"),
    [
        (16, 1, 4, 0),  # one core: nothing to gain
        (16, 2, 4, 2),  # a fork costs milliseconds: one process per core pays on 2 cores
        (16, 2, 1, 0),  # -j 1: one download at a time, one process
        (16, 8, 4, 4),  # never more processes than slots
        (16, 64, 16, 4),  # at most 4
        (3, 8, 8, 0),  # at least 2 downloads each, and never just one process
        (4, 8, 8, 2),
    ],
)
def test_plan_forked(downloads: int, cores: int, jobs: int, expected: int) -> None:
    assert plan_forked(downloads, cores, jobs) == expected


@pytest.mark.timeout(60)
def test_cli_workers_are_forks_of_the_command(
    server: Server, cache_dir: Path, big: bytes, bodies: list[bytes]
) -> None:
    """They run the command's own code (no new interpreter), and their results are its results."""
    slow = [server.add(f"/slow/{i}", body=big, chunk=16 * 1024, throttle=0.01) for i in range(2)]
    quick = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    missing = server.add("/missing", status=404)
    args = ["prefetch", "--json", "-j", "4", "-p", "2", "--cache-dir", str(cache_dir)]
    with subprocess.Popen(
        [sys.executable, "-c", CLI, *args, *slow, *quick, missing],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as cli:
        try:
            _wait_for(lambda: len(psutil.Process(cli.pid).children()) == 2, "no two workers")
            workers = psutil.Process(cli.pid).children()
            # A fork keeps its parent's command line; a spawned worker's is `python -c <boot>`.
            assert all(w.cmdline() == psutil.Process(cli.pid).cmdline() for w in workers)
            # Each in a session of its own: a Ctrl-C in the terminal reaches the command only.
            assert all(os.getsid(w.pid) == w.pid for w in workers)
            out, err = cli.communicate(timeout=50)
        finally:
            if cli.poll() is None:
                cli.kill()
    assert cli.returncode == 1, err
    data = json.loads(out)
    urls = [*slow, *quick]
    assert [r["path"] for r in data["results"][:-1]] == [str(cache_dir / key(u)) for u in urls]
    assert data["results"][-1]["error_type"] == "HTTPStatusError"
    paths = [f"/slow/{i}" for i in range(2)] + [f"/m/{i}" for i in range(4)]
    assert all(len(server.gets(p)) == 1 for p in paths)
    assert leftovers(cache_dir) == []
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


@pytest.mark.timeout(60)
def test_cli_a_killed_forked_worker_fails_its_handles_clearly(
    server: Server, cache_dir: Path, big: bytes, bodies: list[bytes]
) -> None:
    slow = [server.add(f"/slow/{i}", body=big, chunk=16 * 1024, throttle=0.02) for i in range(2)]
    quick = [server.add(f"/m/{i}", body=bodies[i]) for i in range(2)]
    args = ["prefetch", "-q", "-j", "2", "-p", "2", "--cache-dir", str(cache_dir)]
    with subprocess.Popen(
        [sys.executable, "-c", CLI, *args, *slow, *quick],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as cli:
        try:
            _wait_for(
                lambda: sum(n.endswith(".lock") for n in leftovers(cache_dir)) == 2,
                "the two slow downloads never started",
            )
            workers = psutil.Process(cli.pid).children()
            assert len(workers) == 2
            workers[0].kill()
            _out, err = cli.communicate(timeout=50)
        finally:
            if cli.poll() is None:
                cli.kill()
    assert cli.returncode == 1, err
    assert "worker process exited with code -9 while resolving" in err
    # The killed worker's tmp dir and lock were removed by the command; the rest is whole.
    assert leftovers(cache_dir) == []
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_cli_forks_nothing_it_does_not_need(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    """All cached: the forked workers get no work, and end at once; the command exits 0."""
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    args = ["prefetch", "-q", "-p", "2", "--cache-dir", str(cache_dir), *urls]
    for _ in range(2):  # the second run finds everything cached
        done = _python("-c", CLI, *args)
        assert done.returncode == 0, done.stderr
    assert all(len(server.gets(f"/m/{i}")) == 1 for i in range(4))


def test_released_children_end_cleanly_and_siblings_do_not_hold_each_other() -> None:
    """EOF before any config ends a child with 0, even with siblings forked after it."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from asynchub import _workers
        from asynchub._hub import AsyncHub
        children = _workers.prefork(3, AsyncHub.from_config)
        # Close them in reverse: the first child must see EOF though later forks exist.
        codes = []
        for child in reversed(children):
            child.close()
            deadline = time.monotonic() + 10
            while True:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    codes.append(os.waitstatus_to_exitcode(status))
                    break
                assert time.monotonic() < deadline, "a child did not end on EOF"
                time.sleep(0.01)
        more = _workers.prefork(2, AsyncHub.from_config)
        _workers.adopt(more)
        _workers.release()
        for child in more:
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                codes.append("reaped")
        print(codes)
        """
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 0, 0, 'reaped', 'reaped']"


def test_no_fork_with_another_thread_running(cache_dir: Path) -> None:
    """Forking a process with threads is unsafe (a held lock stays held): then nothing is forked."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        config = _config.HubConfig.from_env(cache_dir=cache_dir)
        assert _cli.fork_workers(config, 16, 2) == 0
        assert _workers.parent._forked == []
    finally:
        stop.set()
        other.join()


def test_prefork_refuses_with_another_thread() -> None:
    from asynchub import _workers
    from asynchub._hub import AsyncHub

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(RuntimeError, match="no other thread"):
            _workers.prefork(1, AsyncHub.from_config)
    finally:
        stop.set()
        other.join()


def test_forked_process_wait_from_two_tasks_and_a_poll() -> None:
    """Two tasks may wait on one child while a third polls returncode: all see its exit."""
    script = textwrap.dedent(
        """
        import anyio
        from asynchub import _workers
        from asynchub._hub import AsyncHub

        (child,) = _workers.prefork(1, AsyncHub.from_config)

        async def main():
            process = await _workers.parent._ForkedProcess.adopt(child)
            codes = []

            async def wait():
                codes.append(await process.wait())

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                tg.start_soon(wait)
                await anyio.sleep(0.1)
                assert process.returncode is None
                await process.stdin.aclose()  # EOF before any config: the child ends
                with anyio.fail_after(10):
                    while process.returncode is None:
                        await anyio.sleep(0.01)
            await process.aclose()
            print(codes, process.returncode)

        anyio.run(main)
        """
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 0] 0"
