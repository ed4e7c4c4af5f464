"""Pinned digests (argument, #sha256= fragment, lock file), server checksums, cache verify.

Every way to break a promise: a wrong pin commits nothing and leaves no tmp dir
or lock; a cached entry from other bytes is never returned for a pinned handle.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import asynchub
from asynchub import AsyncHub, HandleError, Hub, IntegrityError, ProgressKind
from asynchub._handles import cache_key, parse
from asynchub._integrity import Pin, parse_digest, read_lock, split_fragment, tree_digest
from asynchub._sources.http import server_md5
from asynchub._store.admin import verify
from asynchub.cli import main as cli_main
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server
from tests._objstores import S3Server

FAST = asynchub.Retries(total=2, backoff=0.01, max_backoff=0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub(cache_dir: Path, **kwargs: Any) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)


def names(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "m1")


@pytest.fixture
def other(tmp_path: Path) -> Path:
    return make_module(tmp_path / "m2", seed=7)


# -- pure ---------------------------------------------------------------------------------


def test_parse_digest_and_fragment() -> None:
    hexd = "ab" * 32
    assert parse_digest(f"sha256:{hexd.upper()}") == hexd
    assert parse_digest(hexd) == hexd
    for bad in ("sha256:abc", "md5:" + hexd, hexd + "0"):
        with pytest.raises(HandleError, match="64 hex digits"):
            parse_digest(bad)
    assert split_fragment(f"https://h/m#sha256={hexd}") == ("https://h/m", hexd)
    assert split_fragment("https://h/m#other") == ("https://h/m#other", None)
    with pytest.raises(HandleError, match="64 hex"):
        parse("https://h/m#sha256=xyz")


def test_fragment_is_stripped_before_the_cache_key() -> None:
    hexd = "cd" * 32
    for handle in ("https://h.example/m/1", "s3://bucket/m.tar.gz", "gs://bucket/m/"):
        parsed = parse(f"{handle}#sha256={hexd}")
        assert parsed.key == cache_key(handle) and parsed.digest == hexd
        assert parsed.name == handle


def test_pin_rules() -> None:
    a, b, t = "a" * 64, "b" * 64, "c" * 64
    origin = Pin(sha256=a, size=10, tree=t)
    assert origin.problem(sha256=a, size=10, tree=None, mirror=False) is None
    assert "archive" in str(origin.problem(sha256=b, size=10, tree=t, mirror=False))
    assert "bytes" in str(origin.problem(sha256=a, size=11, tree=None, mirror=False))
    # A mirror holds a re-pack: the content digest decides.
    assert origin.problem(sha256=b, size=99, tree=t, mirror=True) is None
    assert "content" in str(origin.problem(sha256=a, size=10, tree=b, mirror=True))
    # A bare archive pin accepts a mirror's copy only if it is that very archive.
    assert Pin(sha256=a).problem(sha256=b, size=1, tree=t, mirror=True) is not None
    assert origin.satisfied_by(a, None) and origin.satisfied_by(b, t)
    assert not origin.satisfied_by(b, None)
    with pytest.raises(HandleError, match="give one digest"):
        Pin(sha256=a).agree(Pin(sha256=b, origin="fragment"), "h")
    files = {"b": 1, "a": 2}
    assert tree_digest(files, {"a": a, "b": b}) == tree_digest(
        dict(reversed(files.items())), {"b": b, "a": a}
    )


def test_server_md5_is_read_only_where_it_describes_the_body() -> None:
    digest = hashlib.md5(b"x").digest()
    b64 = base64.b64encode(digest).decode()
    assert server_md5({"content-md5": b64}) == digest
    assert server_md5({"x-goog-hash": f"crc32c=AAAAAA==,md5={b64}"}) == digest
    assert server_md5({"content-md5": b64, "content-encoding": "gzip"}) is None
    gcs_gzip = {"x-goog-hash": f"md5={b64}", "x-goog-stored-content-encoding": "gzip"}
    assert server_md5(gcs_gzip) is None
    assert server_md5({"content-md5": "not base64!"}) is None
    assert server_md5({}) is None


def test_fragment_on_a_directory_is_refused(module: Path) -> None:
    with pytest.raises(HandleError, match="directory"):
        parse(f"{module}#sha256={'0' * 64}")


# -- argument and fragment ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["fragment", "argument"])
async def test_right_digest_resolves_under_tfhub_key(
    server: Server, cache_dir: Path, module: Path, how: str
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    handle, digest = (f"{url}#sha256={sha(body)}", None) if how == "fragment" else (url, None)
    if how == "argument":
        digest = f"sha256:{sha(body)}"
    async with hub(cache_dir) as h:
        path = await h.resolve(handle, digest=digest)
        assert await h.resolve(handle, digest=digest) == path
    assert path == cache_dir / cache_key(url)
    record = json.loads((cache_dir / f"{cache_key(url)}.manifest.json").read_text())
    assert record["sha256"] == sha(body) and record["handle"] == url


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["fragment", "argument"])
async def test_wrong_digest_commits_nothing(
    server: Server, cache_dir: Path, module: Path, how: str
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    wrong = "0" * 64
    handle = f"{url}#sha256={wrong}" if how == "fragment" else url
    digest = f"sha256:{wrong}" if how == "argument" else None
    async with hub(cache_dir) as h:
        with pytest.raises(IntegrityError, match="not the pinned module") as info:
            await h.resolve(handle, digest=digest)
    assert info.value.handle == handle
    assert names(cache_dir) == []  # no module dir, record, tmp dir or lock
    assert len(server.gets("/m/1")) == 1  # refused, not retried


@pytest.mark.anyio
async def test_conflicting_pins_are_a_handle_error(server: Server, cache_dir: Path) -> None:
    url = server.add("/m/1", body=b"")
    async with hub(cache_dir) as h:
        with pytest.raises(HandleError, match="give one digest"):
            await h.resolve(f"{url}#sha256={'1' * 64}", digest=f"sha256:{'2' * 64}")


@pytest.mark.anyio
async def test_cached_entry_from_other_bytes_is_not_returned_for_a_pin(
    server: Server, cache_dir: Path, module: Path, other: Path
) -> None:
    first = tar_bytes(module)
    url = server.add("/m/1", body=first)
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
        assert await h.resolve(url, digest=sha(first)) == path  # recorded: a hit
        assert len(server.gets("/m/1")) == 1
        with pytest.raises(IntegrityError):
            # The entry holds other bytes than pinned: fetched again, and refused.
            await h.resolve(url, digest=sha(tar_bytes(other)))
    assert len(server.gets("/m/1")) == 2
    assert tree(path) == tree(module)  # the old entry stays as it was
    assert [n for n in names(cache_dir) if n.endswith((".tmp", ".lock"))] == []


@pytest.mark.anyio
async def test_pinned_resolve_of_other_bytes_gets_an_entry_of_its_own(
    server: Server, cache_dir: Path, module: Path, other: Path
) -> None:
    first, second = tar_bytes(module), tar_bytes(other)
    url = server.add("/m/1", body=first)
    async with hub(cache_dir) as h:
        base = await h.resolve(url)
        server.routes["/m/1"].body = second
        path = await h.resolve(url, digest=sha(second))  # the cache holds first: fetch
        assert tree(path) == tree(other) and path != base  # the pin's own entry
        assert await h.resolve(url, digest=sha(first)) == base  # still cached, as it was
        with pytest.raises(IntegrityError):
            await h.resolve(url, digest="0" * 64)
    assert tree(base) == tree(module)  # a path handed out keeps its bytes
    assert len(server.gets("/m/1")) == 3
    assert [n for n in names(cache_dir) if n.endswith((".tmp", ".lock"))] == []


def test_sync_fast_path_honours_the_fragment(server: Server, cache_dir: Path, module: Path) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    with Hub(cache_dir=cache_dir, retries=FAST) as h:
        h.resolve(url)
        assert h.resolve(f"{url}#sha256={sha(body)}") == cache_dir / cache_key(url)
        with pytest.raises(IntegrityError):  # the cached entry does not answer it
            h.resolve(f"{url}#sha256={'0' * 64}")


@pytest.mark.anyio
async def test_prefetch_takes_digests(server: Server, cache_dir: Path, module: Path) -> None:
    body = tar_bytes(module)
    good = server.add("/good", body=body)
    bad = server.add("/bad", body=body)
    async with hub(cache_dir) as h:
        results = await h.prefetch(
            [good, bad],
            digests={good: sha(body), bad: f"sha256:{'0' * 64}"},
            return_exceptions=True,
        )
    assert results[0] == cache_dir / cache_key(good)
    assert isinstance(results[1], IntegrityError)
    assert not (cache_dir / cache_key(bad)).exists()


@pytest.mark.anyio
async def test_prefix_is_pinned_by_its_content_digest(
    s3: S3Server, cache_dir: Path, module: Path
) -> None:
    bucket = s3.bucket()
    handle = s3.put_tree(bucket, "m/", module)
    async with hub(cache_dir) as h:
        await h.resolve(handle)
    record = json.loads((cache_dir / f"{cache_key(handle)}.manifest.json").read_text())
    async with hub(tmp := cache_dir.parent / "fresh") as h:
        await h.resolve(f"{handle}#sha256={record['tree_sha256']}")
        with pytest.raises(IntegrityError, match="content"):
            await h.resolve(f"s3://{bucket}/m#sha256={'0' * 64}")
    assert (tmp / cache_key(handle)).is_dir()


# -- server checksums ------------------------------------------------------------------------


@contextlib.contextmanager
def checksum_server(body: bytes, headers: dict[str, str]) -> Iterator[tuple[str, list[int]]]:
    """A server answering every GET with ``body`` and ``headers``; counts the GETs."""
    gets: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            gets.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/m", gets
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["Content-MD5", "x-goog-hash"])
async def test_server_checksum_is_checked_while_streaming(
    cache_dir: Path, module: Path, header: str
) -> None:
    body = tar_bytes(module)

    def value(data: bytes) -> str:
        b64 = base64.b64encode(hashlib.md5(data).digest()).decode()
        return b64 if header == "Content-MD5" else f"crc32c=AAAAAA==,md5={b64}"

    with checksum_server(body, {header: value(body)}) as (url, gets):
        async with hub(cache_dir) as h:
            await h.resolve(url)
    assert len(gets) == 1
    events: list[asynchub.ProgressEvent] = []
    with checksum_server(body, {header: value(b"other bytes")}) as (url, gets):
        async with hub(cache_dir, progress=events.append) as h:
            with pytest.raises(IntegrityError, match="MD5") as info:
                await h.resolve(url)
    assert info.value.handle == url
    assert len(gets) == FAST.total + 1  # a mismatch is retried: bytes may have been hurt
    assert sum(e.kind is ProgressKind.RETRYING for e in events) == FAST.total
    assert not (cache_dir / cache_key(url)).exists()
    assert [n for n in names(cache_dir) if n.endswith((".tmp", ".lock"))] == []


# -- lock files ---------------------------------------------------------------------------


def test_lock_file_round_trip(
    server: Server, s3: S3Server, cache_dir: Path, module: Path, other: Path, tmp_path: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    bucket = s3.bucket()
    prefix = s3.put_tree(bucket, "u/", other)
    runner = CliRunner()
    done = runner.invoke(cli_main, ["lock", url, prefix, "-q", "--cache-dir", str(cache_dir)])
    assert done.exit_code == 0, done.output
    lockfile = tmp_path / "asynchub.lock"
    lockfile.write_text(done.stdout)
    entries = read_lock(lockfile)
    assert set(entries) == {url, prefix}
    assert entries[url].sha256 == sha(body) and entries[url].size == len(body)
    assert entries[prefix].sha256 is None and entries[prefix].tree_sha256

    # A fresh cache, through the lock file: both fetched and accepted.
    fresh = tmp_path / "fresh"
    done = runner.invoke(
        cli_main,
        ["prefetch", "--lockfile", str(lockfile), "--cache-dir", str(fresh), "-q", "-p", "1"],
    )
    assert done.exit_code == 0, done.output
    assert (fresh / cache_key(url)).is_dir() and (fresh / cache_key(prefix)).is_dir()

    # The origin changes: refused, nothing committed; an unlisted handle is refused.
    server.routes["/m/1"].body = tar_bytes(other)
    other_url = server.add("/m/2", body=body)
    with Hub(cache_dir=tmp_path / "third", lockfile=lockfile, retries=FAST) as h:
        with pytest.raises(IntegrityError, match="not the pinned module"):
            h.resolve(url)
        with pytest.raises(IntegrityError, match="not in the lock file"):
            h.resolve(other_url)
        assert h.resolve(prefix).is_dir()
    assert not (tmp_path / "third" / cache_key(url)).exists()
    assert server.gets("/m/2") == []

    done = runner.invoke(
        cli_main,
        [
            "prefetch",
            url,
            "--lockfile",
            str(lockfile),
            "-q",
            "-p",
            "1",
            "--cache-dir",
            str(tmp_path / "fourth"),
        ],
    )
    assert done.exit_code == 1 and "IntegrityError" not in done.stdout
    assert "not the pinned module" in done.stderr


def test_lock_refetches_from_origin_what_lacks_a_digest(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    with Hub(cache_dir=cache_dir) as h:
        h.resolve(url)
    # As tensorflow_hub leaves it: no record of ours.
    (cache_dir / f"{cache_key(url)}.manifest.json").unlink()
    (cache_dir / f"{cache_key(url)}.descriptor.txt").unlink()
    done = CliRunner().invoke(cli_main, ["lock", url, "-q", "--cache-dir", str(cache_dir)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["modules"][url]["sha256"] == sha(body)
    assert len(server.gets("/m/1")) == 2


def test_bad_lock_file_fails_when_the_hub_is_made(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(IntegrityError, match="not an asynchub lock file"):
        AsyncHub(cache_dir=tmp_path, lockfile=bad)
    with pytest.raises(IntegrityError, match="cannot read"):
        AsyncHub(cache_dir=tmp_path, lockfile=tmp_path / "missing.lock")


# -- cache verify --digests -------------------------------------------------------------------


def test_cache_verify_digests_finds_a_file_changed_in_place(
    server: Server, cache_dir: Path, module: Path
) -> None:
    hashed = server.add("/hashed", body=tar_bytes(module))
    plain = server.add("/plain", body=tar_bytes(module))
    with Hub(cache_dir=cache_dir, file_digests=True) as h:
        path = h.resolve(hashed)
    with Hub(cache_dir=cache_dir) as h:
        h.resolve(plain)
    assert all(c.complete for c in verify(cache_dir, digests=True))
    weights = path / "variables" / "variables.data-00000-of-00001"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size: only a hash can tell
    weights.write_bytes(bytes(data))
    assert all(c.complete for c in verify(cache_dir))  # sizes alone: fine
    checks = {c.handle: c for c in verify(cache_dir, digests=True)}
    assert not checks[hashed].complete
    assert checks[hashed].wrong_digest == ["variables/variables.data-00000-of-00001"]
    assert checks[plain].complete and checks[plain].digests_checked is None
    done = CliRunner().invoke(
        cli_main, ["cache", "verify", "--digests", "--cache-dir", str(cache_dir)]
    )
    assert done.exit_code == 1
    assert "changed     variables/variables.data-00000-of-00001" in done.stdout
    assert "no file digests recorded" in done.stdout


def test_the_command_line_has_the_new_commands() -> None:
    # asynchub.cli's group registers every command of asynchub._cli, lock and mirror too.
    for command in (["lock", "--help"], ["mirror", "push", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli_main(command, prog_name="asynchub")
        assert info.value.code == 0


def test_sync_and_module_level_calls_take_a_digest(
    server: Server, cache_dir: Path, module: Path, other: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/pinned-sync", body=body)
    with Hub(cache_dir=cache_dir, retries=FAST) as h:
        with pytest.raises(IntegrityError):
            h.resolve(url, digest=sha(tar_bytes(other)))
        assert not (cache_dir / cache_key(url)).exists()
        path = h.resolve(url, digest=sha(body))
        # A cached entry answers a pin only when its record holds that digest.
        with pytest.raises(IntegrityError):
            h.resolve(url, digest=sha(tar_bytes(other)))
        assert h.prefetch([url], digests={url: sha(body)}) == [path]
    assert asynchub.resolve(url, digest=sha(body)) == path
