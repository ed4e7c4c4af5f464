"""The pure parts, called directly: handles, retry schedule, member checks, locks."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from asynchub import ArchiveError, HandleError, Retries, UnsafeArchiveError, _archive
from asynchub._handles import HandleKind, cache_key, compressed_url, parse
from asynchub._retry import is_retryable_status, parse_retry_after, retry_delay
from asynchub._store import Entry, locks
from tests._archives import make_module, tar_bytes, tree

# -- handles ----------------------------------------------------------------------


def test_cache_key_is_tensorflow_hubs() -> None:
    # sha1 of the handle as given, as tensorflow_hub's compressed resolver computes it.
    handle = "https://tfhub.dev/google/progan-128/1"
    assert cache_key(handle) == hashlib.sha1(handle.encode("utf8")).hexdigest()
    assert len(cache_key(handle)) == 40
    assert cache_key("a") != cache_key("a/")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/m/1", "http://h/m/1?tf-hub-format=compressed"),
        ("http://h/m?v=2", "http://h/m?v=2&tf-hub-format=compressed"),
        ("http://h/m?tf-hub-format=uncompressed&a=", "http://h/m?a=&tf-hub-format=compressed"),
        ("https://h:8443/m#frag", "https://h:8443/m?tf-hub-format=compressed#frag"),
    ],
)
def test_compressed_url(url: str, expected: str) -> None:
    assert compressed_url(url) == expected


def test_parse_kinds(tmp_path: Path) -> None:
    module = make_module(tmp_path / "m")
    archive = tmp_path / "m.tgz"
    archive.write_bytes(tar_bytes(module))
    assert parse(str(module)).kind is HandleKind.DIRECTORY
    assert parse(module).kind is HandleKind.DIRECTORY
    assert parse(archive).kind is HandleKind.ARCHIVE
    assert parse(archive.as_uri()).path == archive
    url = parse("HTTPS://example.com/m/1")
    assert url.kind is HandleKind.URL
    assert url.key == cache_key("HTTPS://example.com/m/1")


@pytest.mark.parametrize(
    ("handle", "message"),
    [
        ("", "empty handle"),
        ("ftp://bucket/m", "unsupported scheme 'ftp'"),
        ("s3://B/m.tar.gz", "names no valid bucket"),
        ("http:///nohost", "names no host"),
        ("file://otherhost/x.tar", "remote host"),
        ("/definitely/not/here", "does not exist"),
    ],
)
def test_parse_errors_name_the_handle(handle: str, message: str) -> None:
    with pytest.raises(HandleError, match=message) as ei:
        parse(handle)
    assert ei.value.handle == handle


def test_parse_refuses_non_archive_files(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(HandleError, match=r"not a \.tar"):
        parse(f)
    with pytest.raises(HandleError, match="must be a str or a path"):
        parse(42)  # type: ignore[arg-type]


# -- retry schedule ---------------------------------------------------------------


def test_retryable_statuses() -> None:
    assert [s for s in (200, 400, 404, 408, 429, 500, 503, 599) if is_retryable_status(s)] == [
        429,
        500,
        503,
        599,
    ]


def test_retry_after_seconds_and_date() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = Retries(total=10, backoff=1.0, max_backoff=8.0, max_retry_after=5.0)
    rng = random.Random(1)
    for retry, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (9, 8.0)]:
        delays = [retry_delay(retry, policy, rng=rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # the whole range is used: full jitter
    assert retry_delay(0, policy, retry_after=3) == 3
    assert retry_delay(0, policy, retry_after=300) == 5.0


# -- archives ---------------------------------------------------------------------


def _pull_from(data: bytes, size: int = 1000):  # type: ignore[no-untyped-def]
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return lambda: chunks.pop(0) if chunks else b""


def test_sniff() -> None:
    assert _archive.sniff(b"\x1f\x8b\x08rest") == "gzip"
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        t.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    assert _archive.sniff(tar.getvalue()[:512]) == "tar"
    v7 = io.BytesIO()
    with tarfile.open(fileobj=v7, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    assert _archive.sniff(v7.getvalue()[:512]) == "tar"
    with pytest.raises(ArchiveError, match="text/html, not a tar archive"):
        _archive.sniff(b"<html>" + b" " * 600, "text/html; charset=utf-8")
    with pytest.raises(ArchiveError, match="HTML page"):
        _archive.sniff(b"  <!DOCTYPE html>" + b" " * 600, None)
    with pytest.raises(ArchiveError, match=r"not a tar or tar\.gz archive"):
        _archive.sniff(b"PK\x03\x04" + b"\0" * 600, "application/zip")


@pytest.mark.parametrize("backend", _archive.GZIP_BACKENDS)
def test_extract_with_each_gzip_backend(tmp_path: Path, backend: str) -> None:
    src = make_module(tmp_path / "src", weights=300_000)
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _archive.extract(_pull_from(tar_bytes(src)), dest, limit=10**9, backend=backend)
    assert tree(dest) == tree(src)
    assert manifest.compressed
    assert manifest.files["variables/variables.index"] == 100
    assert manifest.total_bytes == sum(len(v) for v in tree(src).values())


def test_extract_multi_member_gzip(tmp_path: Path) -> None:
    src = make_module(tmp_path / "src")
    plain = tar_bytes(src, gz=False)
    half = len(plain) // 2
    data = gzip.compress(plain[:half]) + gzip.compress(plain[half:])
    dest = tmp_path / "dest"
    dest.mkdir()
    _archive.extract(_pull_from(data, 777), dest, limit=10**9)
    assert tree(dest) == tree(src)


def test_gzip_bomb_is_stopped_by_the_limit_not_by_memory(tmp_path: Path) -> None:
    info = tarfile.TarInfo("saved_model.pb")
    info.size = 200 * 1024 * 1024
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = buf.getvalue()
    assert len(bomb) < 1024 * 1024
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="more than"):
        _archive.extract(_pull_from(bomb, 64 * 1024), dest, limit=10 * 1024 * 1024)
    assert list(dest.iterdir()) == []


def test_check_member_normalises_names() -> None:
    info = tarfile.TarInfo("./variables/./x")
    info.size = 1
    assert _archive.check_member(info, extracted=0, limit=10) == "variables/x"
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    assert _archive.check_member(root, extracted=0, limit=10) == ""


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("/etc/x", tarfile.REGTYPE, "absolute"),
        ("C:\\x", tarfile.REGTYPE, "absolute"),
        ("a/../../x", tarfile.REGTYPE, r"'\.\.'"),
        ("l", tarfile.SYMTYPE, "symlink"),
        ("l", tarfile.LNKTYPE, "hardlink"),
        ("d", tarfile.BLKTYPE, "device"),
        ("f", tarfile.FIFOTYPE, "fifo"),
        ("v", b"V", "unsupported type"),
    ],
)
def test_check_member_refuses(name: str, kind: bytes, message: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    with pytest.raises(UnsafeArchiveError, match=message):
        _archive.check_member(info, extracted=0, limit=10)


# -- locks ------------------------------------------------------------------------


def test_parse_lock_handles_dotted_host_names() -> None:
    info = locks.parse_lock("build.example.com.1234.abcdef")
    assert info is not None
    assert (info.host, info.pid, info.uid) == ("build.example.com", 1234, "abcdef")
    assert locks.parse_lock("garbage") is None


def test_lock_is_exclusive_and_released_only_by_its_owner(tmp_path: Path) -> None:
    entry = Entry(tmp_path, "k")
    ours, theirs = locks.lock_contents("a"), locks.lock_contents("b")
    assert locks.try_acquire(entry, ours)
    assert not locks.try_acquire(entry, theirs)
    locks.release_lock(entry, theirs)
    assert locks.read_lock(entry) == ours
    locks.release_lock(entry, ours)
    assert locks.read_lock(entry) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_break_lock_only_breaks_the_expected_lock(tmp_path: Path) -> None:
    entry = Entry(tmp_path, "k")
    assert locks.try_acquire(entry, "fresh.1.x")
    assert not locks.break_lock(entry, "stale.2.y")
    assert locks.read_lock(entry) == "fresh.1.x"  # put back
    assert locks.break_lock(entry, "fresh.1.x")
    assert locks.read_lock(entry) is None
    assert list(tmp_path.iterdir()) == []


def test_holder_is_dead() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = socket.gethostname()
    assert locks.holder_is_dead(locks.LockInfo(host, int(dead.stdout), "u", ""))
    assert not locks.holder_is_dead(locks.LockInfo(host, os.getppid(), "u", ""))
    assert not locks.holder_is_dead(locks.LockInfo(host, os.getpid(), "u", ""))
    assert not locks.holder_is_dead(locks.LockInfo("elsewhere", int(dead.stdout), "u", ""))
