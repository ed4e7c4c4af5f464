"""The worker-process boundary and the command line's edges (issue 21, section 3).

Every test here signals or starves a *child* process running the command line
(never the test runner), against a real HTTP server on 127.0.0.1 that paces its
bodies so a signal lands mid-download. Each checks the promise: the exit code,
every process of the command gone within a few seconds, and a cache with no
``*.tmp`` dir, no lock and no partial module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import asynchub
from asynchub import AsyncHub
from asynchub._integrity import write_lock
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests.test_prefetch import FAST, complete, key, leftovers

REPO = Path(__file__).resolve().parents[1]
ENTRY = "from asynchub.cli import main; main(prog_name='asynchub')"
#: Each body takes seconds: 8 KiB every 50 ms of a ~1 MB archive.
SLOW = {"chunk": 8 * 1024, "throttle": 0.05}


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("modules")
    return [tar_bytes(make_module(root / f"m{i}", weights=20_000, seed=i)) for i in range(4)]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tar_bytes(make_module(tmp_path_factory.mktemp("big") / "big", weights=1_000_000))


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("TFHUB_DOWNLOAD_PROGRESS", None)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-W", "error", "-c", ENTRY, *args]


def _shell(redirects: str, *args: str) -> list[str]:
    """The command under ``sh``, with the shell's redirections (``<&- >&-``, ``>/dev/full``)."""
    words = " ".join(_quote(a) for a in _command(*args))
    return ["sh", "-c", f"exec {words} {redirects}"]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _locks(cache_dir: Path) -> int:
    return sum(n.endswith(".lock") for n in leftovers(cache_dir))


def _no_partial_module(cache_dir: Path, handles: list[str]) -> None:
    """Each handle's entry is whole or absent; and no stray dir sits in the cache."""
    for handle in handles:
        entry = cache_dir / key(handle)
        assert not entry.exists() or complete(cache_dir, handle), handle
    assert leftovers(cache_dir) == []


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start commands; whatever is still running at the end is killed, its workers too."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(argv, env=_env(), text=True, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc  # type: ignore[no-any-return]

    yield start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()
        proc.communicate()


# -- finding: stdin and stdout closed -----------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_prefetch_with_stdin_and_stdout_closed_does_not_hang(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    popen: Callable[..., subprocess.Popen[str]],
) -> None:
    """``<&- >&-`` (some supervisors): the forked workers' sockets must not become fds 0 and 1.

    The modules are fetched; the paths cannot be printed, which is said on stderr.
    """
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    args = ["prefetch", "-q", "-p", "2", "--cache-dir", str(cache_dir), *urls]
    cli = popen(_shell("<&- >&-", *args), stdout=None)
    try:
        _out, err = cli.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the command hung with stdin and stdout closed")
    assert cli.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: "), err
    assert "output" in err.strip().splitlines()[-1], err
    assert all(complete(cache_dir, u) for u in urls)
    assert leftovers(cache_dir) == []


# -- finding: workers outlive a killed command ------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_cli_workers_stop_with_the_command(
    server: Server,
    cache_dir: Path,
    big: bytes,
    popen: Callable[..., subprocess.Popen[str]],
    sig: signal.Signals,
) -> None:
    """A worker whose command is gone stops at once and removes its tmp dir and lock."""
    urls = [server.add(f"/slow/{i}", body=big, **SLOW) for i in range(4)]
    args = ["prefetch", "-q", "-j", "4", "-p", "2", "--cache-dir", str(cache_dir), *urls]
    cli = popen(_command(*args))
    _wait_for(lambda: _locks(cache_dir) == 4, "the four downloads never started")
    workers = psutil.Process(cli.pid).children()
    assert len(workers) == 2
    cli.send_signal(sig)
    _out, err = cli.communicate(timeout=10)
    assert cli.returncode == (-9 if sig is signal.SIGKILL else 143), err
    _wait_for(lambda: not _alive(workers), "a worker outlived the command", timeout=5)
    _no_partial_module(cache_dir, urls)
    # Nothing was committed after the command died: every body was seconds from its end.
    assert not any((cache_dir / key(u)).exists() for u in urls)


# -- finding: SIGTERM cleans up like Ctrl-C --------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command",
    [["resolve"], ["prefetch", "-p", "1"], ["prefetch", "-p", "2"]],
    ids=["resolve", "prefetch-in-process", "prefetch-workers"],
)
def test_cli_sigterm_cleans_up_and_exits_143(
    server: Server,
    cache_dir: Path,
    big: bytes,
    popen: Callable[..., subprocess.Popen[str]],
    command: list[str],
) -> None:
    count = 1 if command == ["resolve"] else 4
    urls = [server.add(f"/slow/{i}", body=big, **SLOW) for i in range(count)]
    cli = popen(_command(*command, "-q", "--cache-dir", str(cache_dir), *urls))
    _wait_for(lambda: _locks(cache_dir) == count, "the downloads never started")
    processes = [psutil.Process(cli.pid), *psutil.Process(cli.pid).children(recursive=True)]
    cli.send_signal(signal.SIGTERM)
    _out, err = cli.communicate(timeout=15)
    assert cli.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated", err
    assert "Traceback" not in err
    _wait_for(lambda: not _alive(processes), "a process outlived SIGTERM", timeout=5)
    _no_partial_module(cache_dir, urls)


# -- finding: workers take the parent's config, not the environment's ----------------------


@pytest.fixture
def stray_lockfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ASYNCHUB_LOCKFILE names a lock file that lists no handle: honoured, it refuses all."""
    path = tmp_path / "stray.lock"
    write_lock(path, [])
    monkeypatch.setenv("ASYNCHUB_LOCKFILE", str(path))
    return path


@pytest.mark.anyio
async def test_spawned_workers_take_lockfile_off_from_the_parent(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    stray_lockfile: Path,
    spawned: list[int],
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    async with AsyncHub(cache_dir=cache_dir, lockfile="", retries=FAST) as h:
        assert h.config.lockfile is None
        paths = await h.prefetch(urls, processes=2)
    assert paths == [cache_dir / key(u) for u in urls]
    assert len(spawned) == 2


def test_sync_hub_workers_take_lockfile_off_from_the_parent(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    stray_lockfile: Path,
    spawned: list[int],
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    with asynchub.Hub(cache_dir=cache_dir, lockfile="", retries=FAST) as h:
        assert h.prefetch(urls, processes=2) == [cache_dir / key(u) for u in urls]
    assert len(spawned) == 2


@pytest.mark.timeout(60)
def test_cli_forked_workers_take_lockfile_off_from_the_command(
    server: Server, cache_dir: Path, bodies: list[bytes], stray_lockfile: Path
) -> None:
    """``--lockfile ''`` turns ASYNCHUB_LOCKFILE off, in the command and its forked workers."""
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    args = ["prefetch", "--json", "-q", "-p", "2", "--lockfile", "", "--cache-dir", str(cache_dir)]
    done = subprocess.run(
        _command(*args, *urls), env=_env(), capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [r["path"] for r in data["results"]] == [str(cache_dir / key(u)) for u in urls]
    # And the variable, unless turned off, holds in the workers too: every handle refused.
    other = cache_dir.parent / "other"
    done = subprocess.run(
        _command("prefetch", "--json", "-q", "-p", "2", "--cache-dir", str(other), *urls),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stderr
    assert {r["error_type"] for r in json.loads(done.stdout)["results"]} == {"IntegrityError"}


# -- also expected: every OSError of the command line is one error line ------------------------


def _one_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, env=_env(), stderr=subprocess.PIPE, text=True, timeout=50, **kwargs
    )


@pytest.fixture
def cached(server: Server, cache_dir: Path, bodies: list[bytes]) -> list[str]:
    """Two handles already in the cache, so ``cache ls`` and ``resolve`` have output."""
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(2)]
    with asynchub.Hub(cache_dir=cache_dir) as h:
        h.prefetch(urls)
    return urls


def _broken_pipe() -> int:
    """A pipe's write end whose read end is already closed: every write is EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize(
    "args",
    [
        ["cache", "ls"],
        ["cache", "ls", "--json"],
        ["cache", "path"],
        ["cache", "verify"],
        ["resolve", "-q", "CACHED"],
        ["prefetch", "-q", "CACHED", "CACHED2"],
        ["--help"],
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("where", ["broken pipe", "closed", "/dev/full"])
def test_cli_output_errors_are_one_line(
    cache_dir: Path, cached: list[str], args: list[str], where: str
) -> None:
    args = [{"CACHED": cached[0], "CACHED2": cached[1]}.get(a, a) for a in args]
    if args[0] != "--help":
        args += ["--cache-dir", str(cache_dir)]
    if where == "broken pipe":
        fd = _broken_pipe()
        try:
            done = _run(_command(*args), stdout=fd)
        finally:
            os.close(fd)
    elif where == "closed":
        done = _run(_shell(">&-", *args), stdout=None)
    else:
        done = _run(_shell(">/dev/full", *args), stdout=None)
    assert done.returncode == 1, done.stderr
    line = _one_error(done)
    assert "output" in line, line


@pytest.mark.timeout(60)
def test_cli_prefetch_json_to_a_full_device(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    """The downloads (in forked workers) are whole; the output is lost, and said to be."""
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    args = ["prefetch", "--json", "-q", "-p", "2", "--cache-dir", str(cache_dir), *urls]
    done = _run(_shell(">/dev/full", *args), stdout=None)
    assert done.returncode == 1, done.stderr
    assert _one_error(done) == "error: cannot write the output: No space left on device"
    assert all(complete(cache_dir, u) for u in urls)
    assert leftovers(cache_dir) == []


def test_cli_output_error_with_stderr_closed_too(cache_dir: Path, cached: list[str]) -> None:
    """Nowhere to say it: only the exit code tells."""
    done = _run(
        _shell(">/dev/full 2>&-", "cache", "ls", "--cache-dir", str(cache_dir)), stdout=None
    )
    assert done.returncode == 1
    assert done.stderr == ""


def test_cli_stderr_broken_pipe_keeps_the_exit_code(server: Server, cache_dir: Path) -> None:
    """An error that cannot even be printed still exits 1, without a traceback anywhere."""
    missing = server.add("/missing", status=404)
    fd = _broken_pipe()
    try:
        done = subprocess.run(
            _command("resolve", "-q", "--cache-dir", str(cache_dir), missing),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=fd,
            text=True,
            timeout=50,
        )
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["prefetch", "lock"])
def test_cli_unreadable_handles_file_is_one_line(cache_dir: Path, command: str) -> None:
    """Reading --from-file - from a closed stdin is an OSError too."""
    done = _run(_shell("<&-", command, "--from-file", "-", "--cache-dir", str(cache_dir)))
    assert done.returncode == 1, done.stderr
    assert _one_error(done) == "error: cannot read handles from stdin: Bad file descriptor"


@pytest.mark.parametrize(
    "args",
    [["cache", "ls"], ["cache", "prune"], ["cache", "verify"], ["resolve", "-q", "URL"],
     ["prefetch", "-q", "-p", "2", "URL", "URL2"]],
    ids=lambda a: " ".join(a),
)  # fmt: skip
def test_cli_cache_dir_under_a_file_is_one_line(
    server: Server, tmp_path: Path, bodies: list[bytes], args: list[str]
) -> None:
    """An OSError from the cache itself (a file where a dir should be): one line, exit 1."""
    urls = {"URL": server.add("/m/0", body=bodies[0]), "URL2": server.add("/m/1", body=bodies[1])}
    path = tmp_path / "file"
    path.write_text("not a dir")
    done = _run(_command(*(urls.get(a, a) for a in args), "--cache-dir", str(path / "sub")))
    assert done.returncode == 1, done.stderr
    if args[0] == "prefetch":  # a line per handle, then the one error line
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "error: 2 of 2 handles failed"
    else:
        assert str(path / "sub") in _one_error(done)


def test_cli_an_os_error_anywhere_is_one_line(tmp_path: Path) -> None:
    """The backstop: an OSError no layer below turned into a HubError (here pack's) is one line."""
    module = make_module(tmp_path / "module")
    path = tmp_path / "file"
    path.write_text("not a dir")
    done = _run(_command("pack", str(module), str(path / "out.tar.gz")))
    assert done.returncode == 1, done.stderr
    assert "Not a directory" in _one_error(done)


# -- the same promises for the library's own workers (no command line) -----------------------


_LIBRARY_PREFETCH = """
import json, os, sys
import anyio
from asynchub import AsyncHub, _workers

backend, cache_dir, fork, close_fds, *urls = sys.argv[1:]
if close_fds == "yes":
    os.close(0)
    os.close(1)
if fork == "yes":
    _workers.adopt(_workers.prefork(2, AsyncHub.from_config))

async def main():
    async with AsyncHub(cache_dir=cache_dir, max_concurrency=4) as hub:
        paths = await hub.prefetch(urls, processes=2)
    print(json.dumps([str(p) for p in paths]), file=sys.stderr)

anyio.run(main, backend=backend)
"""


def _library(
    backend: str, cache_dir: Path, urls: list[str], *, fork: bool, close: bool
) -> list[str]:
    flags = ["yes" if fork else "no", "yes" if close else "no"]
    return [
        sys.executable,
        "-W",
        "error",
        "-c",
        _LIBRARY_PREFETCH,
        backend,
        str(cache_dir),
        *flags,
        *urls,
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("fork", [False, True], ids=["spawned", "forked"])
def test_library_workers_stop_when_their_parent_is_killed(
    server: Server,
    cache_dir: Path,
    big: bytes,
    popen: Callable[..., subprocess.Popen[str]],
    backend: str,
    fork: bool,
) -> None:
    """EOF without the end line: the parent is gone, and a worker stops and cleans up."""
    urls = [server.add(f"/slow/{i}", body=big, **SLOW) for i in range(4)]
    parent = popen(_library(backend, cache_dir, urls, fork=fork, close=False))
    _wait_for(lambda: _locks(cache_dir) == 4, "the four downloads never started")
    workers = psutil.Process(parent.pid).children()
    assert len(workers) == 2
    parent.kill()
    parent.communicate(timeout=10)
    _wait_for(lambda: not _alive(workers), "a worker outlived its parent", timeout=5)
    _no_partial_module(cache_dir, urls)
    assert not any((cache_dir / key(u)).exists() for u in urls)


@pytest.mark.timeout(60)
def test_forked_workers_with_stdin_and_stdout_closed(
    server: Server,
    cache_dir: Path,
    bodies: list[bytes],
    popen: Callable[..., subprocess.Popen[str]],
) -> None:
    """prefork() itself copes with fds 0 and 1 closed: its sockets get those numbers."""
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(4)]
    parent = popen(_library("asyncio", cache_dir, urls, fork=True, close=True))
    try:
        _out, err = parent.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("prefetch hung with the forked workers' sockets on fds 0 and 1")
    assert parent.returncode == 0, err
    assert json.loads(err.strip().splitlines()[-1]) == [str(cache_dir / key(u)) for u in urls]
    assert leftovers(cache_dir) == []
