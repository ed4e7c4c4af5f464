"""Pins, lock files and mirrors (issue 21, section 5): every way to break their promises.

- a lock file describes the origin's bytes, never what the cache holds now;
- a digest means what its type says (archive or content), wherever it is given;
- a path handed out for a pin keeps its bytes, whatever is resolved later;
- a mirror's bad copy falls back to the origin like any other fault;
- a failed ``asynchub lock`` leaves no file behind.

Real servers on 127.0.0.1 (the test HTTP server, moto's S3), real cache dirs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

import asynchub
from asynchub import AsyncHub, HandleError, Hub, IntegrityError, ProgressKind
from asynchub._handles import cache_key, parse
from asynchub._integrity import LockEntry, Pin, pin_of, read_lock, split_fragment, write_lock
from asynchub._store.admin import list_entries, prune, remove, verify
from asynchub.cli import main as cli_main
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server
from tests._objstores import S3Server

FAST = asynchub.Retries(total=1, backoff=0.01, max_backoff=0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(root: Path) -> str:
    """The module's content digest computed from a directory, as _integrity defines it."""
    from asynchub._integrity import tree_digest

    files = tree(root)
    return tree_digest({k: len(v) for k, v in files.items()}, {k: sha(v) for k, v in files.items()})


def hub(cache_dir: Path, **kwargs: Any) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **kwargs)


def names(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def leftovers(cache_dir: Path) -> list[str]:
    return [n for n in names(cache_dir) if n.endswith((".tmp", ".lock"))]


def cli(*args: str) -> Any:
    return CliRunner().invoke(cli_main, list(args))


def lock_file(*handles: str, cache_dir: Path, out: Path) -> Path:
    done = cli("lock", *handles, "-q", "--cache-dir", str(cache_dir), "-o", str(out))
    assert done.exit_code == 0, done.output
    return out


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "v1")


@pytest.fixture
def other(tmp_path: Path) -> Path:
    return make_module(tmp_path / "v2", seed=5)


def alter_in_place(path: Path) -> None:
    """Change one byte of a cached module's weights: same size, other bytes."""
    weights = path / "variables" / "variables.data-00000-of-00001"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))


# -- 1. a lock file describes the origin's bytes -----------------------------------------------


def test_lock_describes_the_origin_not_an_altered_cache(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    with Hub(cache_dir=cache_dir) as h:
        alter_in_place(h.resolve(url))
    lockfile = lock_file(url, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    entry = read_lock(lockfile)[url]
    assert entry.sha256 == sha(body) and entry.size == len(body)
    assert entry.tree_sha256 == content_digest(module)  # the origin's, not the altered files'

    # mirror push publishes the origin's module, never the altered copy.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    done = cli("mirror", "push", str(mirror), url, "-q", "--cache-dir", str(cache_dir))
    if done.exit_code == 0:
        pushed = tmp_path / "pushed"
        with tarfile.open(mirror / f"{cache_key(url)}.tar.gz") as tar:
            tar.extractall(pushed, filter="data")
        assert tree(pushed) == tree(module)
    else:  # or it refuses, saying why, and pushes nothing
        assert "changed" in done.stderr and url in done.stderr
        assert list(mirror.iterdir()) == []

    # A mirror that holds the altered module anyway is refused by the lock file.
    altered = tmp_path / "altered"
    with Hub(cache_dir=cache_dir) as h:
        asynchub.pack(h.resolve(url), altered.with_suffix(".tar.gz"))
    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    altered.with_suffix(".tar.gz").rename(bad_mirror / f"{cache_key(url)}.tar.gz")
    gets = len(server.gets("/m/1"))
    with (
        Hub(cache_dir=tmp_path / "fresh", lockfile=lockfile, mirrors=[str(bad_mirror)]) as h,
        pytest.raises(IntegrityError, match="content"),
    ):
        h.resolve(url)
    assert len(server.gets("/m/1")) == gets
    assert names(tmp_path / "fresh") == []


def test_mirror_push_publishes_the_origins_module(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    with Hub(cache_dir=cache_dir) as h:
        alter_in_place(h.resolve(url))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    done = cli("mirror", "push", str(mirror), url, "-q", "--cache-dir", str(cache_dir))
    assert done.exit_code == 0, done.output
    pushed = tmp_path / "pushed"
    with tarfile.open(mirror / f"{cache_key(url)}.tar.gz") as tar:
        tar.extractall(pushed, filter="data")
    assert tree(pushed) == tree(module)
    # The consumers' side: a lock file and the mirror; the origin is not asked.
    lockfile = lock_file(url, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    gets = len(server.gets("/m/1"))
    with Hub(cache_dir=tmp_path / "fresh", lockfile=lockfile, mirrors=[str(mirror)]) as h:
        assert tree(h.resolve(url)) == tree(module)
    assert len(server.gets("/m/1")) == gets


@pytest.mark.anyio
async def test_lock_entry_does_not_rewrite_the_entry_others_hold(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    async with hub(cache_dir) as h:
        path = await h.resolve(url)
        inode = (path / "saved_model.pb").stat().st_ino
        entry = await h.lock_entry(url)  # the record has no content digest: fetched again
        assert entry.tree_sha256 == content_digest(module)
        assert (path / "saved_model.pb").stat().st_ino == inode  # not swapped under a reader
        assert await h.resolve(url) == path
        again = await h.lock_entry(url)
    assert again == entry
    assert leftovers(cache_dir) == []


# -- 2. digests told apart by type ----------------------------------------------------------


def test_pin_of_tells_digests_apart_by_type() -> None:
    a, t, x = "a" * 64, "b" * 64, "c" * 64
    lock = LockEntry("h", a, 10, t).pin(Path("asynchub.lock"))
    # Given alone: an archive's digest, or a prefix's content digest.
    assert pin_of([(a, "digest argument")], None, prefix=False, handle="h") == Pin(
        sha256=a, origin="digest argument"
    )
    assert pin_of([(t, "fragment")], None, prefix=True, handle="h") == Pin(
        tree=t, origin="fragment"
    )
    # With a lock entry, a digest agrees when it is either of the entry's digests.
    for given in (a, t):
        pin = pin_of([(given, "#sha256= fragment")], lock, prefix=False, handle="h")
        assert pin is not None and (pin.sha256, pin.size, pin.tree) == (a, 10, t)
    with pytest.raises(HandleError, match="give one digest"):
        pin_of([(x, "digest argument")], lock, prefix=False, handle="h")
    with pytest.raises(HandleError, match="give one digest"):
        pin_of([(a, "digest argument"), (x, "fragment")], None, prefix=False, handle="h")
    assert pin_of([], None, prefix=False, handle="h") is None


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["fragment", "argument"])
async def test_prefix_pinned_by_its_content_digest_in_a_hub_with_its_lock_file(
    s3: S3Server, cache_dir: Path, module: Path, tmp_path: Path, how: str
) -> None:
    bucket = s3.bucket()
    prefix = s3.put_tree(bucket, "m/", module)
    lockfile = await anyio.to_thread.run_sync(
        lambda: lock_file(prefix, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    )
    tree_sha = read_lock(lockfile)[prefix].tree_sha256
    handle, digest = (f"{prefix}#sha256={tree_sha}", None)
    if how == "argument":
        handle, digest = prefix, f"sha256:{tree_sha}"
    fresh = tmp_path / "fresh"
    async with hub(fresh, lockfile=lockfile) as h:
        path = await h.resolve(handle, digest=digest)
        assert tree(path) == tree(module)
        with pytest.raises(HandleError, match="give one digest"):
            await h.resolve(f"{prefix}#sha256={'0' * 64}")


@pytest.mark.anyio
async def test_url_pinned_by_either_digest_of_its_lock_entry(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    lockfile = await anyio.to_thread.run_sync(
        lambda: lock_file(url, cache_dir=cache_dir, out=tmp_path / "asynchub.lock")
    )
    entry = read_lock(lockfile)[url]
    async with hub(tmp_path / "fresh", lockfile=lockfile) as h:
        path = await h.resolve(f"{url}#sha256={entry.tree_sha256}")
        assert await h.resolve(url, digest=entry.sha256) == path
        assert tree(path) == tree(module)


# -- 3. a pinned path keeps its bytes -------------------------------------------------------


@pytest.mark.anyio
async def test_a_pinned_path_keeps_its_bytes(
    server: Server, cache_dir: Path, module: Path, other: Path
) -> None:
    v1, v2 = tar_bytes(module), tar_bytes(other)
    url = server.add("/m/1", body=v1)
    async with hub(cache_dir) as h:
        p1 = await h.resolve(url, digest=sha(v1))
        assert p1 == cache_dir / cache_key(url)  # the first one: tensorflow_hub's entry
        server.routes["/m/1"].body = v2
        p2 = await h.resolve(f"{url}#sha256={sha(v2)}")
        assert p2 != p1
        assert tree(p1) == tree(module)  # v1's path still holds v1, byte for byte
        assert tree(p2) == tree(other)
        gets = len(server.gets("/m/1"))
        # Each pin finds its own entry again, in this hub and a new one.
        assert await h.resolve(url, digest=sha(v1)) == p1
        assert await h.resolve(url, digest=sha(v2)) == p2
        assert await h.resolve(url) == p1  # unpinned: tensorflow_hub's entry, as it is
    async with hub(cache_dir) as h:
        assert await h.resolve(f"{url}#sha256={sha(v2)}") == p2
        assert await h.lookup(f"{url}#sha256={sha(v2)}") == p2
    assert len(server.gets("/m/1")) == gets
    assert leftovers(cache_dir) == []


def test_a_pinned_path_keeps_its_bytes_sync_and_with_lock_files(
    server: Server, cache_dir: Path, module: Path, other: Path, tmp_path: Path
) -> None:
    v1, v2 = tar_bytes(module), tar_bytes(other)
    url = server.add("/m/1", body=v1)
    lock1 = lock_file(url, cache_dir=tmp_path / "c1", out=tmp_path / "v1.lock")
    server.routes["/m/1"].body = v2
    lock2 = lock_file(url, cache_dir=tmp_path / "c2", out=tmp_path / "v2.lock")
    server.routes["/m/1"].body = v1
    with Hub(cache_dir=cache_dir, lockfile=lock1, retries=FAST) as h1:
        p1 = h1.resolve(url)
        server.routes["/m/1"].body = v2
        with Hub(cache_dir=cache_dir, lockfile=lock2, retries=FAST) as h2:
            p2 = h2.resolve(url)
            assert p2 != p1 and tree(p2) == tree(other)
            assert h2.resolve(url) == p2
        assert tree(p1) == tree(module)
        assert h1.resolve(url) == p1

    # The cache commands see both entries and handle each on its own.
    entries = {e.path: e for e in list_entries(cache_dir)}
    assert set(entries) == {p1, p2}
    assert all(e.complete for e in entries.values())
    assert entries[p1].handle == url and entries[p2].handle is not None
    assert entries[p2].handle.startswith(f"{url}#sha256=")
    assert all(c.complete for c in verify(cache_dir, digests=True))
    done = cli("cache", "ls", "--json", "--cache-dir", str(cache_dir))
    assert done.exit_code == 0, done.output
    assert {e["path"] for e in json.loads(done.stdout)["entries"]} == {str(p1), str(p2)}
    assert prune(cache_dir, incomplete=True) == []
    alter_in_place(p2)
    [check] = [c for c in verify(cache_dir, digests=True) if c.key == p2.name]
    assert not check.complete and check.wrong_digest
    with pytest.raises(asynchub.CacheError, match="no cache entry"):
        remove(cache_dir, f"{url}#sha256={'0' * 64}")  # a pin nothing holds: not the base entry
    assert p1.exists() and p2.exists()
    removed = remove(cache_dir, entries[p2].handle)
    assert {r.path for r in removed if r.kind == "module"} == {p2}
    assert not p2.exists() and tree(p1) == tree(module)


@pytest.mark.anyio
async def test_concurrent_resolves_with_two_pins_keep_both_paths(
    server: Server, cache_dir: Path, module: Path, other: Path
) -> None:
    v1, v2 = tar_bytes(module), tar_bytes(other)
    server.add("/v1", body=v1)
    url = server.add("/m/1", body=v1)
    async with hub(cache_dir) as h:
        p1 = await h.resolve(url, digest=sha(v1))
        server.routes["/m/1"].body = v2
        paths: dict[str, Path] = {}

        async def one(name: str, digest: str) -> None:
            paths[name] = await h.resolve(url, digest=digest)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "v2", sha(v2))
            tg.start_soon(one, "v2 again", sha(v2))
            tg.start_soon(one, "v1", sha(v1))
    assert paths["v1"] == p1 and paths["v2"] == paths["v2 again"] != p1
    assert tree(p1) == tree(module) and tree(paths["v2"]) == tree(other)
    assert leftovers(cache_dir) == []


# -- 4. prefetch(digests=...) on a handle with a fragment -------------------------------------


@pytest.mark.anyio
async def test_prefetch_digests_on_a_handle_that_has_a_fragment(
    server: Server, cache_dir: Path, module: Path
) -> None:
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    same = f"{url}#sha256={sha(body)}"
    other_url = server.add("/m/2", body=body)
    clash = f"{other_url}#sha256={sha(body)}"
    async with hub(cache_dir) as h:
        results = await h.prefetch(
            [same, clash],
            digests={same: f"sha256:{sha(body)}", clash: "0" * 64},
            return_exceptions=True,
        )
    assert results[0] == cache_dir / cache_key(url)  # tensorflow_hub's key, one fragment
    assert isinstance(results[1], HandleError) and "one digest" in str(results[1])
    assert results[1].handle is not None and other_url in results[1].handle
    assert server.gets("/m/2") == []


def test_split_fragment_takes_one_pin_only() -> None:
    a, b = "a" * 64, "b" * 64
    for twice in (f"https://h/m#sha256={a}#sha256={a}", f"https://h/m#sha256={a}#sha256={b}"):
        with pytest.raises(HandleError, match="one digest"):
            split_fragment(twice)
        with pytest.raises(HandleError, match="one digest"):
            parse(twice)


# -- 5. a mirror's copy without a module at its root ---------------------------------------


def nested_tar(src: Path) -> bytes:
    """An archive whose root holds one directory with the module in it (a common mistake)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="module")
    return buf.getvalue()


@pytest.mark.anyio
async def test_mirror_copy_without_a_module_root_falls_back_to_the_origin(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{cache_key(url)}.tar.gz").write_bytes(nested_tar(module))
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, mirrors=[str(mirror)], progress=events.append) as h:
        path = await h.resolve(url)
    assert tree(path) == tree(module)
    assert len(server.gets("/m/1")) == 1
    retried = [e for e in events if e.kind is ProgressKind.RETRYING]
    assert len(retried) == 1 and "saved_model.pb" in str(retried[0].error)
    record = json.loads((cache_dir / f"{cache_key(url)}.manifest.json").read_text())
    assert "mirror" not in record
    assert leftovers(cache_dir) == []


def test_mirror_copy_without_a_module_root_sync(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{cache_key(url)}.tar.gz").write_bytes(nested_tar(module))
    with Hub(cache_dir=cache_dir, mirrors=[str(mirror)], retries=FAST) as h:
        assert tree(h.resolve(url)) == tree(module)


# -- 6. a failed lock leaves no file ----------------------------------------------------------


def test_failed_lock_leaves_no_file(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    good = server.add("/good", body=tar_bytes(module))
    bad = server.add("/bad", status=404)
    out = tmp_path / "locks" / "asynchub.lock"
    out.parent.mkdir()
    done = cli("lock", good, bad, "-q", "--cache-dir", str(cache_dir), "-o", str(out))
    assert done.exit_code == 1 and bad in done.stderr
    assert list(out.parent.iterdir()) == []  # no lock file, empty or partial; no temp file
    assert done.stdout == ""

    out.write_text("previous\n")
    done = cli("lock", good, bad, "-q", "--cache-dir", str(cache_dir), "-o", str(out))
    assert done.exit_code == 1
    assert out.read_text() == "previous\n"  # the old lock file stands
    assert list(out.parent.iterdir()) == [out]

    done = cli("lock", good, "-q", "--cache-dir", str(cache_dir), "-o", str(out))
    assert done.exit_code == 0, done.output
    assert set(read_lock(out)) == {good} and done.stdout == ""
    assert list(out.parent.iterdir()) == [out]


def test_lock_into_a_missing_dir_is_a_clear_error(
    server: Server, cache_dir: Path, module: Path, tmp_path: Path
) -> None:
    url = server.add("/m/1", body=tar_bytes(module))
    out = tmp_path / "no such dir" / "asynchub.lock"
    done = cli("lock", url, "-q", "--cache-dir", str(cache_dir), "-o", str(out))
    assert done.exit_code == 1 and "cannot write the lock file" in done.stderr
    assert not out.parent.exists() and "Traceback" not in done.output


def test_write_lock_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "asynchub.lock"
    out.write_text("previous\n")

    class Boom(Exception):
        pass

    class Exploding(LockEntry):
        def to_json(self) -> dict[str, Any]:
            raise Boom

    with pytest.raises(Boom):
        write_lock(
            out, [LockEntry("a", "a" * 64, 1, "b" * 64), Exploding("b", None, None, "c" * 64)]
        )
    assert out.read_text() == "previous\n" and list(tmp_path.iterdir()) == [out]
    write_lock(out, [LockEntry("a", "a" * 64, 1, "b" * 64)])
    assert set(read_lock(out)) == {"a"} and list(tmp_path.iterdir()) == [out]
