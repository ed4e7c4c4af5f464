"""The store's promises, each tried against the defect that once broke it.

Pure functions (lock verdict, resume decision, key rule, OSError mapping) are
called directly; everything else runs end to end against a real HTTP server on
127.0.0.1, on asyncio and trio, and real file systems (a small tmpfs for a full
disk, a read-only mount) where the platform allows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import asynchub
from asynchub import (
    ArchiveError,
    AsyncHub,
    CacheError,
    HandleError,
    HubError,
    LockTimeoutError,
    NetworkError,
    Timeouts,
    TruncatedArchiveError,
)
from asynchub._handles import HandleKind, parse
from asynchub._sources.http import Validators, resume_ok
from asynchub._store import Entry, LockView, Store, Verdict, cache_error, layout, verdict
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server

FAST = asynchub.Retries(total=3, backoff=0.01, max_backoff=0.05)
HOST = socket.gethostname()


def key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def leftovers(cache_dir: Path) -> list[str]:
    """Download dirs, locks and temporary files: what must never outlive a call."""
    if not cache_dir.exists():
        return []
    return sorted(
        p.name for p in cache_dir.iterdir() if p.name.endswith((".tmp", ".lock", ".stale"))
    )


def hub(cache_dir: Path, **kwargs: object) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def raw_tar(members: list[tuple[str, bytes | None]], *, gz: bool = True) -> bytes:
    """A tar of the given members in order; ``None`` data makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "module-src")


# -- the lock verdict: a pure function -------------------------------------------------


def judge(view: LockView, *, now: float = 1000.0, alive: bool = True) -> Verdict:
    return verdict(view, now=now, stale_after=600.0, host=HOST, alive=lambda pid: alive)[0]


def test_verdict_covers_every_kind_of_lock() -> None:
    mine = f"{HOST}.123.abc"
    assert judge(LockView(None)) is Verdict.FREE
    assert judge(LockView(mine, mtime=990.0)) is Verdict.ALIVE
    assert judge(LockView(mine, mtime=990.0), alive=False) is Verdict.DEAD
    assert judge(LockView("far.example.org.1.abc", mtime=990.0)) is Verdict.OTHER_HOST
    assert judge(LockView("", mtime=990.0)) is Verdict.UNREADABLE
    assert judge(LockView("garbage", mtime=990.0)) is Verdict.UNREADABLE


def test_verdict_judges_staleness_from_the_files_own_timestamps() -> None:
    # Untouched for longer than the limit: taken over at once, whoever holds it.
    for text in ("", "far.example.org.1.abc", f"{HOST}.123.abc"):
        assert judge(LockView(text, mtime=100.0)) is Verdict.STALLED
    # A download dir that still moves keeps an old lock alive.
    view = LockView("far.example.org.1.abc", mtime=100.0, tmp_mtime=995.0)
    assert judge(view) is Verdict.OTHER_HOST
    # A dead holder is taken over at once even when its files are fresh.
    assert judge(LockView(f"{HOST}.1.abc", mtime=999.0), alive=False) is Verdict.DEAD
    assert Verdict.DEAD.take_over and Verdict.STALLED.take_over
    assert not any(v.take_over for v in (Verdict.ALIVE, Verdict.OTHER_HOST, Verdict.UNREADABLE))


# -- the resume decision: a pure function ----------------------------------------------


FIRST = Validators(etag='"v1"', total=1000, ranges=True)


def test_resume_needs_the_first_validator_and_length() -> None:
    ok = {"content-range": "bytes 400-999/1000", "etag": '"v1"'}
    assert resume_ok(FIRST, 206, ok, 400)
    assert not resume_ok(FIRST, 200, ok, 400)  # the whole body again
    assert not resume_ok(FIRST, 206, ok, 300)  # another offset
    assert not resume_ok(FIRST, 206, {**ok, "etag": '"v2"'}, 400)  # a new version
    assert not resume_ok(FIRST, 206, {"content-range": "bytes 400-999/1000"}, 400)
    assert not resume_ok(FIRST, 206, {**ok, "content-range": "bytes 400-1199/1200"}, 400)
    by_date = Validators(last_modified="Tue, 01 Dec 2026 10:00:00 GMT", total=1000, ranges=True)
    dated = {"content-range": "bytes 400-999/1000", "last-modified": by_date.last_modified or ""}
    assert resume_ok(by_date, 206, dated, 400)
    assert not resume_ok(by_date, 206, {**dated, "last-modified": "Wed"}, 400)


def test_only_provable_bodies_are_resumable() -> None:
    assert FIRST.resumable
    assert not Validators(etag='"v1"', total=None, ranges=True).resumable
    assert not Validators(etag='"v1"', total=1000, ranges=False).resumable
    weak = Validators.of({"etag": 'W/"v1"', "content-length": "10", "accept-ranges": "bytes"})
    assert weak.etag is None and not weak.resumable


def test_default_timeouts_notice_a_stall_and_give_up_within_a_minute() -> None:
    t = Timeouts()
    assert t.read <= 20
    # Each stall costs one read timeout; the budget allows at least one resume.
    assert t.stalled >= 2 * t.read
    # The last stall ends the download; between stalls, a resume's or a restart's back-off.
    worst = t.stalled + 2 * sum(min(30.0, 0.5 * 2**n) for n in range(3))
    assert worst < 60


# -- keys and handles: pure ------------------------------------------------------------


def test_local_archives_are_keyed_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.tar.gz").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "a")
    in_a = parse("m.tar.gz")
    monkeypatch.chdir(tmp_path / "b")
    in_b = parse("m.tar.gz")
    assert in_a.key != in_b.key
    assert in_a.key == key(str(tmp_path / "a" / "m.tar.gz"))
    assert parse((tmp_path / "b" / "m.tar.gz").as_uri()).key == in_b.key
    assert in_b.kind is HandleKind.ARCHIVE and in_b.stamp is not None
    # http handles keep tensorflow_hub's key: sha1 of the text as given.
    assert parse("https://h.example/m/1").key == key("https://h.example/m/1")


@pytest.mark.parametrize(
    "text",
    ["http://[::1/m", "http://host/m\x00", "http://host:99999/m", "http://host:port/m", "http://"],
)
def test_malformed_urls_are_handle_errors(text: str) -> None:
    with pytest.raises(HandleError) as info:
        parse(text)
    assert info.value.handle == text


# -- OSError becomes CacheError: pure --------------------------------------------------


def test_oserrors_map_to_cache_errors_that_say_what_to_do(tmp_path: Path) -> None:
    full = cache_error(OSError(errno.ENOSPC, "No space left"), tmp_path, "h", "extracting")
    assert "no space left" in str(full) and "TFHUB_CACHE_DIR" in str(full)
    ro = cache_error(OSError(errno.EROFS, "Read-only file system"), tmp_path, "h", "extracting")
    assert "cannot write" in str(ro) and ro.handle == "h"
    with pytest.raises(CacheError), Store(tmp_path).guard("h", "testing"):
        raise PermissionError(errno.EACCES, "Permission denied")


# -- completeness ----------------------------------------------------------------------


def test_tfhub_entries_need_whole_variables(tmp_path: Path) -> None:
    entry = Entry(tmp_path, key("x"))
    make_module(entry.module_dir)
    store = Store(tmp_path)
    assert store.lookup(entry.key) == entry.module_dir
    (entry.module_dir / "variables" / "variables.data-00000-of-00001").unlink()
    assert Store(tmp_path).lookup(entry.key) is None
    (entry.module_dir / "variables" / "variables.data-00000-of-00002").write_bytes(b"1")
    assert Store(tmp_path).lookup(entry.key) is None  # shard 1 of 2 is missing
    (entry.module_dir / "variables" / "variables.data-00001-of-00002").write_bytes(b"2")
    assert Store(tmp_path).lookup(entry.key) == entry.module_dir


# -- end to end, on asyncio and trio ----------------------------------------------------


@pytest.mark.anyio
async def test_a_local_archive_is_the_file_it_names_now(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srcs = [make_module(tmp_path / f"src{i}", seed=i) for i in range(3)]
    for i, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.tar.gz").write_bytes(tar_bytes(srcs[i]))
    async with hub(cache_dir) as h:
        monkeypatch.chdir(tmp_path / "a")
        from_a = await h.resolve("m.tar.gz")
        monkeypatch.chdir(tmp_path / "b")
        from_b = await h.resolve("m.tar.gz")
        assert tree(from_a) == tree(srcs[0])
        assert tree(from_b) == tree(srcs[1])
        # Rebuilt in place: the next resolve sees the new bytes.
        archive = tmp_path / "b" / "m.tar.gz"
        archive.write_bytes(tar_bytes(srcs[2]))
        os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
        again = await h.resolve("m.tar.gz")
    assert again == from_b
    assert tree(again) == tree(srcs[2])
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
async def test_a_body_without_length_cut_short_is_retried_then_refused(
    server: Server, cache_dir: Path, module: Path, gz: bool
) -> None:
    body = tar_bytes(module, gz=gz)
    # A plain tar cut exactly at a member boundary (a header block) looks whole to tarfile.
    cut = 1024 if not gz else len(body) // 2
    once = server.add("/once", body=body, no_length=True, cut_at=cut)
    always = server.add("/always", body=body[:cut], no_length=True)
    async with hub(cache_dir) as h:
        path = await h.resolve(once)
        assert tree(path) == tree(module)
        assert len(server.gets("/once")) == 2
        with pytest.raises(TruncatedArchiveError) as info:
            await h.resolve(always)
    assert info.value.handle == always
    assert len(server.gets("/always")) == FAST.total + 1
    assert not (cache_dir / key(always)).exists()
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
async def test_a_resume_never_splices_two_versions(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    old = tar_bytes(make_module(tmp_path / "old", seed=1), gz=False)
    new = tar_bytes(make_module(tmp_path / "new", seed=2), gz=False)
    assert len(old) == len(new)  # so only the validator can tell them apart
    url = server.add("/m", body=old, cut_at=len(old) // 2, next_body=new)
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
    assert tree(path) == tree(tmp_path / "new")
    gets = server.gets("/m")
    assert [("Range" in g) for g in gets] == [False, True, False]  # resumed, refused, restarted
    record = json.loads((cache_dir / f"{key(url)}.manifest.json").read_text())
    assert record["sha256"] == hashlib.sha256(new).hexdigest()


@pytest.mark.anyio
async def test_an_entry_that_lost_its_record_is_fetched_again(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
    # A temp cleaner took the record and a variables file.
    (cache_dir / f"{key(url)}.manifest.json").unlink()
    (path / "variables" / "variables.index").unlink()
    async with hub(cache_dir) as h:
        again = await h.resolve(url)
    assert tree(again) == tree(module)
    assert len(server.gets("/m")) == 2
    # The record alone lost: asynchub wrote the entry, so it is incomplete too.
    (cache_dir / f"{key(url)}.manifest.json").unlink()
    async with hub(cache_dir) as h:
        await h.resolve(url)
    assert len(server.gets("/m")) == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    "members",
    [
        [("saved_model.pb", b"pb"), ("a", None), ("a", b"file")],
        [("saved_model.pb", b"pb"), ("a", b"file"), ("a/b", b"inner")],
    ],
    ids=["dir-then-file", "file-then-child"],
)
async def test_member_conflicts_are_archive_errors(
    server: Server, cache_dir: Path, members: list[tuple[str, bytes | None]]
) -> None:
    url = server.add("/m", body=raw_tar(members))
    async with hub(cache_dir) as h:
        with pytest.raises(ArchiveError) as info:
            await h.resolve(url)
    assert info.value.handle == url and "'a" in str(info.value)
    assert leftovers(cache_dir) == [] and not (cache_dir / key(url)).exists()


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.anyio
async def test_a_full_disk_is_a_cache_error_and_leaves_nothing(
    server: Server, tmp_path: Path
) -> None:
    big = make_module(tmp_path / "big", weights=3 * 1024 * 1024)
    url = server.add("/big", body=tar_bytes(big))
    small = make_module(tmp_path / "small", weights=1000)
    fits = server.add("/small", body=tar_bytes(small))
    with mounted_tmpfs(tmp_path / "fs", "1m") as fs:
        cache = fs / "cache"
        async with hub(cache) as h:
            with pytest.raises(CacheError) as info:
                await h.resolve(url)
            assert "no space left" in str(info.value) and info.value.handle == url
            assert leftovers(cache) == [] and not (cache / key(url)).exists()
            # The space is given back: a module that fits still resolves.
            assert tree(await h.resolve(fits)) == tree(small)


@pytest.mark.anyio
async def test_a_read_only_cache_is_a_cache_error(server: Server, tmp_path: Path) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m")))
    with mounted_tmpfs(tmp_path / "fs", "4m") as fs:
        (fs / "cache").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        async with hub(fs / "cache") as h:
            with pytest.raises(CacheError) as info:
                await h.resolve(url)
    assert "cannot write" in str(info.value) and info.value.handle == url


@pytest.mark.anyio
async def test_prefetch_keeps_the_good_and_reports_each_bad_in_place(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    good = [
        server.add(f"/g{i}", body=tar_bytes(make_module(tmp_path / f"g{i}", seed=i)))
        for i in range(3)
    ]
    clash = server.add(
        "/clash", body=raw_tar([("saved_model.pb", b"pb"), ("a", None), ("a", b"file")])
    )
    missing = server.url("/nothing-here")
    handles = [good[0], clash, good[1], missing, good[2]]
    async with hub(cache_dir) as h:
        results = await h.prefetch(handles, return_exceptions=True)
    assert [type(r).__name__ for r in results] == [
        "PosixPath",
        "UnsafeArchiveError",
        "PosixPath",
        "HTTPStatusError",
        "PosixPath",
    ]
    for handle, result in zip(handles, results, strict=True):
        if isinstance(result, HubError):
            assert result.handle == handle
        else:
            assert result == cache_dir / key(handle)
    assert leftovers(cache_dir) == []


def test_cli_prefetch_says_one_line_per_failure_and_no_traceback(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    good = server.add("/g", body=tar_bytes(make_module(tmp_path / "g")))
    clash = server.add(
        "/clash", body=raw_tar([("saved_model.pb", b"pb"), ("a", b"f"), ("a/b", b"x")])
    )
    missing = server.url("/nothing-here")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asynchub",
            "prefetch",
            "-q",
            "-p",
            "2",
            "--cache-dir",
            str(cache_dir),
            good,
            clash,
            missing,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2
    assert done.stdout.strip() == f"{cache_dir / key(good)}\t{good}"


@pytest.mark.anyio
async def test_an_empty_lock_is_taken_over_once_it_is_old(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    cache_dir.mkdir(parents=True)
    lock = cache_dir / f"{key(url)}.lock"
    lock.write_text("")
    # Fresh: somebody may be writing it. Wait, and time out.
    async with hub(cache_dir, lock_timeout=0.5) as h:
        with pytest.raises(LockTimeoutError):
            await h.resolve(url)
    assert lock.exists()
    # Untouched for longer than the stale limit: taken over at once.
    old = time.time() - 700
    os.utime(lock, (old, old))
    async with hub(cache_dir, lock_timeout=5) as h:
        with anyio.fail_after(5):
            path = await h.resolve(url)
    assert tree(path) == tree(module)
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
async def test_lock_waiters_notice_completion_without_the_lock(
    server: Server, cache_dir: Path, module: Path
) -> None:
    """A holder that completes the entry but keeps its lock (it is still tidying up)."""
    url = server.add("/m", body=tar_bytes(module))
    async with hub(cache_dir / "other") as other:
        done = await other.resolve(url)
    entry = Entry(cache_dir, key(url))
    entry.lock.write_text(f"{HOST}.{os.getppid()}.live")  # a live holder

    def finish() -> None:
        time.sleep(0.3)
        for name in (f"{key(url)}.descriptor.txt", f"{key(url)}.manifest.json"):
            (cache_dir / name).write_bytes((done.parent / name).read_bytes())
        os.rename(done, entry.module_dir)

    thread = threading.Thread(target=finish)
    thread.start()
    async with hub(cache_dir) as h:
        with anyio.fail_after(5):
            path = await h.resolve(url)
    thread.join()
    assert path == entry.module_dir and tree(path) == tree(module)
    assert entry.lock.exists()  # never ours to take
    assert len(server.gets("/m")) == 1


@pytest.mark.anyio
async def test_a_dead_holders_download_dir_is_removed(
    server: Server, cache_dir: Path, module: Path
) -> None:
    url = server.add("/m", body=tar_bytes(module))
    cache_dir.mkdir(parents=True)
    entry = Entry(cache_dir, key(url))
    uid = "d" * 32
    entry.lock.write_text(f"{HOST}.{dead_pid()}.{uid}")
    (entry.tmp_dir(uid) / "variables").mkdir(parents=True)
    orphan = entry.tmp_dir("e" * 32)  # a lockless leftover of an older crash
    orphan.mkdir()
    async with hub(cache_dir) as h:
        with anyio.fail_after(10):
            path = await h.resolve(url)
    assert tree(path) == tree(module)
    assert leftovers(cache_dir) == []


def test_a_downloader_killed_with_sigkill_leaves_nothing_after_the_next_resolve(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    src = make_module(tmp_path / "src", weights=2 * 1024 * 1024)
    url = server.add("/slow", body=tar_bytes(src), chunk=32 * 1024, throttle=0.05)
    script = textwrap.dedent(
        f"""
        import asynchub
        asynchub.Hub(cache_dir={str(cache_dir)!r}).resolve({url!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".tmp") for p in cache_dir.glob("*")):
            assert time.monotonic() < deadline, "the child never started its download"
            assert child.poll() is None
            time.sleep(0.05)
        child.kill()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert leftovers(cache_dir)  # its lock and download dir
    server.routes["/slow"].throttle = 0.0
    with asynchub.Hub(cache_dir=cache_dir, retries=FAST) as h:
        path = h.resolve(url)
    assert tree(path) == tree(src)
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
async def test_a_stall_once_is_survived_and_a_stalling_server_is_given_up_on(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    quick = Timeouts(connect=2.0, read=0.3, stalled=1.0)
    once = server.add("/once", body=body, stall_at=len(body) // 2, stall_for=0.8)
    always = server.add(
        "/always", body=body, stall_at=len(body) // 2, stall_for=3.0, stall_times=100
    )
    async with hub(cache_dir, timeout=quick) as h:
        path = await h.resolve(once)
        assert tree(path) == tree(module)
        assert "Range" in server.gets("/once")[-1]  # resumed, not restarted
        started = time.monotonic()
        with pytest.raises(NetworkError) as info:
            await h.resolve(always)
        took = time.monotonic() - started
    assert "stalled" in str(info.value) and info.value.handle == always
    assert took < 3.0
    assert leftovers(cache_dir) == []


@pytest.mark.anyio
async def test_configured_headers_stay_on_their_origin(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    server.add("/m", body=body)
    port = server.base.rsplit(":", 1)[1]
    elsewhere = f"http://localhost:{port}/m"  # another origin: another host name
    same = server.add("/same", redirect=server.url("/m"))
    away = server.add("/away", redirect=elsewhere)
    secret = {"X-Api-Key": "s3cret", "Authorization": "Bearer t"}
    async with hub(cache_dir, headers=secret) as h:
        await h.resolve(same)
        first = server.gets("/m")[-1]
        assert first.get("X-Api-Key") == "s3cret" and first.get("Authorization") == "Bearer t"
        await h.resolve(away)
        second = server.gets("/m")[-1]
    assert second["Host"].startswith("localhost")
    assert "X-Api-Key" not in second and "Authorization" not in second


def test_worker_processes_keep_the_parents_import_path() -> None:
    from asynchub._workers import parent

    probe = parent._BOOT.replace(
        "from asynchub._launch import worker; worker()", "print(json.dumps(sys.path))"
    )
    assert probe != parent._BOOT
    parent = [p for p in sys.path if p]
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(parent)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert json.loads(done.stdout) == parent


def test_the_store_is_the_one_lookup(tmp_path: Path) -> None:
    """The cache commands and the hub answer "is it complete?" alike."""
    from asynchub._store import admin

    entry = Entry(tmp_path, key("x"))
    make_module(entry.module_dir)
    layout.write_descriptor(entry, "x")  # asynchub's mark, but no record
    assert Store(tmp_path).lookup(entry.key) is None
    [check] = admin.verify(tmp_path)
    assert not check.complete and "record is gone" in (check.problem or "")


def test_a_lock_link_whose_reply_was_lost_still_counts_as_taken(
    server: Server, tmp_path: Path, module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS retransmits a LINK whose reply was lost; the server answers EEXIST for it."""
    url = server.add("/m", body=tar_bytes(module))
    real_link = os.link
    lost: list[str] = []

    def link_reply_lost(src: object, dst: object, *args: object, **kwargs: object) -> None:
        real_link(src, dst, *args, **kwargs)  # type: ignore[arg-type]
        if str(dst).endswith(".lock") and not lost:
            lost.append(str(dst))
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))

    monkeypatch.setattr(os, "link", link_reply_lost)
    with asynchub.Hub(cache_dir=tmp_path / "cache", lock_timeout=2.0, retries=FAST) as h:
        assert h.resolve(url) == tmp_path / "cache" / key(url)
    assert lost
    assert leftovers(tmp_path / "cache") == []
