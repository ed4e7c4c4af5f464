"""Cache tools (list, remove, prune, verify) on cache dirs laid out by the tests."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asynchub import AsyncHub, CacheError
from asynchub._store import layout as cache
from asynchub._store.admin import list_entries, prune, remove, verify
from tests._archives import make_module, tar_bytes

HOST = socket.gethostname()
UTC = datetime.timezone.utc


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


def names(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir()}


def add_entry(
    cache_dir: Path,
    handle: str,
    *,
    manifest: bool = True,
    written: datetime.datetime | None = None,
    seed: int = 0,
) -> Path:
    """An entry as asynchub (manifest) or tensorflow_hub (descriptor only) writes it."""
    module = make_module(cache_dir / key(handle), weights=5_000, seed=seed)
    written = written or datetime.datetime.now(UTC)
    (cache_dir / f"{key(handle)}.descriptor.txt").write_text(
        f"Module: {handle}\nDownload Time: {written.astimezone().replace(tzinfo=None)}\n"
        f"Downloader Hostname: {HOST} (PID:1)"
    )
    if manifest:
        files = {
            p.relative_to(module).as_posix(): p.stat().st_size
            for p in module.rglob("*")
            if p.is_file()
        }
        dirs = sorted(p.relative_to(module).as_posix() for p in module.rglob("*") if p.is_dir())
        record = {
            "format": cache.MANIFEST_FORMAT,
            "handle": handle,
            "bytes": sum(files.values()),
            "written": written.isoformat(timespec="seconds"),
            "files": files,
            "dirs": dirs,
        }
        (cache_dir / f"{key(handle)}.manifest.json").write_text(json.dumps(record))
    return module


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def layout(cache_dir: Path) -> dict[str, str]:
    """A cache with one of everything; returns name -> handle (or key)."""
    cache_dir.mkdir(parents=True)
    h = {
        "good": "https://example.com/good/1",
        "tfhub": "https://example.com/tfhub-written/1",
        "broken": "https://example.com/broken/1",
        "old": "https://example.com/old/1",
        "dead": "https://example.com/dead-downloader/1",
        "live": "https://example.com/live-downloader/1",
        "remote": "https://example.com/other-host/1",
        "remote_busy": "https://example.com/other-host-busy/1",
        "orphan": "https://example.com/orphan/1",
    }
    add_entry(cache_dir, h["good"], seed=1)
    add_entry(cache_dir, h["tfhub"], manifest=False, seed=2)
    broken = add_entry(cache_dir, h["broken"], seed=3)
    (broken / "variables" / "variables.index").unlink()
    (broken / "assets" / "vocab.txt").write_text("truncated")
    add_entry(cache_dir, h["old"], written=datetime.datetime.now(UTC) - datetime.timedelta(40))
    add_entry(cache_dir, h["orphan"])
    cache.remove_tree(cache_dir / key(h["orphan"]))  # a record without its module dir

    # A download whose process died: its lock and half-written .tmp dir remain.
    (cache_dir / f"{key(h['dead'])}.lock").write_text(f"{HOST}.{dead_pid()}.dead1")
    make_module(cache_dir / f"{key(h['dead'])}.dead1.tmp", weights=1000)
    # A download in progress in a live process (our parent, the test runner's shell).
    (cache_dir / f"{key(h['live'])}.lock").write_text(f"{HOST}.{os.getppid()}.live1")
    make_module(cache_dir / f"{key(h['live'])}.live1.tmp", weights=1000)
    # Another host's lock with no download dir, long untouched: stale.
    remote_lock = cache_dir / f"{key(h['remote'])}.lock"
    remote_lock.write_text("builder.example.org.4242.far1")
    age(remote_lock, 3600)
    # Another host's lock whose download dir is growing: live.
    (cache_dir / f"{key(h['remote_busy'])}.lock").write_text("builder.example.org.4243.far2")
    make_module(cache_dir / f"{key(h['remote_busy'])}.far2.tmp", weights=1000)
    # A leftover download dir with no lock, and temporary files of atomic writes.
    make_module(cache_dir / f"{key(h['good'])}.0badc0de.tmp", weights=1000)
    old_tmp = cache_dir / f"{key(h['good'])}.manifest.json.0ld.tmp"
    old_tmp.write_text("{}")
    age(old_tmp, 3600)
    (cache_dir / f"{key(h['tfhub'])}.descriptor.txt.fresh.tmp").write_text("x")
    return h


# -- list / verify --------------------------------------------------------------


def test_list_entries(cache_dir: Path, layout: dict[str, str]) -> None:
    entries = {e.handle: e for e in list_entries(cache_dir)}
    assert set(entries) == {
        layout[n] for n in ("good", "tfhub", "broken", "old", "orphan")
    }  # locks and .tmp dirs are not entries
    good = entries[layout["good"]]
    assert good.key == key(layout["good"]) and good.path == cache_dir / good.key
    assert good.complete and good.has_manifest and not good.locked
    assert good.size > 5_000
    assert good.fetched is not None
    assert abs((datetime.datetime.now(UTC) - good.fetched).total_seconds()) < 60
    tfhub = entries[layout["tfhub"]]
    assert tfhub.complete and not tfhub.has_manifest  # handle from the descriptor
    assert not entries[layout["broken"]].complete
    assert not entries[layout["orphan"]].complete and entries[layout["orphan"]].size == 0
    old = entries[layout["old"]].fetched
    assert old is not None and (datetime.datetime.now(UTC) - old).days == 40
    assert json.loads(json.dumps(good.to_json()))["bytes"] == good.size


def test_list_entries_of_a_missing_dir(tmp_path: Path) -> None:
    assert list_entries(tmp_path / "nope") == []


def test_verify_names_missing_and_wrong_size_files(cache_dir: Path, layout: dict[str, str]) -> None:
    checks = {c.handle: c for c in verify(cache_dir)}
    assert checks[layout["good"]].complete and checks[layout["good"]].problem is None
    assert checks[layout["tfhub"]].complete and not checks[layout["tfhub"]].has_manifest
    broken = checks[layout["broken"]]
    assert not broken.complete
    assert broken.missing == ["variables/variables.index"]
    assert broken.wrong_size == [("assets/vocab.txt", 6, 9)]
    assert broken.problem == "1 missing, 1 of the wrong size"
    assert checks[layout["orphan"]].problem == "no module dir"
    assert broken.to_json()["wrong_size"] == [
        {"path": "assets/vocab.txt", "expected": 6, "actual": 9}
    ]


# -- prune -------------------------------------------------------------------------


def test_prune_dry_run_removes_nothing(cache_dir: Path, layout: dict[str, str]) -> None:
    before = names(cache_dir)
    planned = prune(
        cache_dir, older_than=datetime.timedelta(days=30), incomplete=True, dry_run=True
    )
    assert names(cache_dir) == before
    assert planned and {p.path.name for p in planned} <= before


def test_prune_removes_leftovers_and_stale_locks_only(
    cache_dir: Path, layout: dict[str, str]
) -> None:
    k = {n: key(h) for n, h in layout.items()}
    removed = prune(cache_dir)
    got = {(r.kind, r.path.name) for r in removed}
    assert got == {
        ("tmp", f"{k['dead']}.dead1.tmp"),
        ("tmp", f"{k['good']}.0badc0de.tmp"),
        ("tmp", f"{k['good']}.manifest.json.0ld.tmp"),
        ("lock", f"{k['dead']}.lock"),
        ("lock", f"{k['remote']}.lock"),
    }
    reasons = {r.path.name: r.reason for r in removed}
    assert "is dead" in reasons[f"{k['dead']}.lock"]
    assert "nothing changed for" in reasons[f"{k['remote']}.lock"]
    left = names(cache_dir)
    assert not {name for _, name in got} & left
    # Live downloads, fresh temporary files and every entry stay.
    for kept in (
        f"{k['live']}.lock",
        f"{k['live']}.live1.tmp",
        f"{k['remote_busy']}.lock",
        f"{k['remote_busy']}.far2.tmp",
        f"{k['tfhub']}.descriptor.txt.fresh.tmp",
        k["good"],
        k["broken"],
        k["old"],
        f"{k['orphan']}.manifest.json",
    ):
        assert kept in left
    assert prune(cache_dir) == []  # nothing more to do


def test_prune_incomplete_spares_live_downloads(cache_dir: Path, layout: dict[str, str]) -> None:
    k = {n: key(h) for n, h in layout.items()}
    removed = prune(cache_dir, incomplete=True)
    entries = {r.key for r in removed if r.kind in ("module", "descriptor", "manifest")}
    assert entries == {k["broken"], k["orphan"]}
    left = names(cache_dir)
    assert not any(n.startswith((k["broken"], k["orphan"])) for n in left)
    assert {k["good"], k["tfhub"], k["old"], f"{k['live']}.lock"} <= left
    assert {e.handle for e in list_entries(cache_dir)} == {
        layout[n] for n in ("good", "tfhub", "old")
    }


def test_prune_older_than(cache_dir: Path, layout: dict[str, str]) -> None:
    removed = prune(cache_dir, older_than=datetime.timedelta(days=30))
    old = [r for r in removed if r.key == key(layout["old"])]
    assert {r.kind for r in old} == {"module", "descriptor", "manifest"}
    assert "older than 30d" in old[0].reason
    assert not (cache_dir / key(layout["old"])).exists()
    assert (cache_dir / key(layout["good"])).is_dir()
    assert not prune(cache_dir, older_than=datetime.timedelta(days=30))


# -- remove ------------------------------------------------------------------------------


def test_remove_by_handle_and_by_key(cache_dir: Path, layout: dict[str, str]) -> None:
    k = key(layout["good"])
    planned = remove(cache_dir, layout["good"], dry_run=True)
    assert (cache_dir / k).is_dir()
    assert {r.kind for r in planned} == {"module", "descriptor", "manifest", "tmp"}
    assert remove(cache_dir, layout["good"]) == planned
    assert not any(n.startswith(k) for n in names(cache_dir) if not n.endswith("0ld.tmp"))

    tf = key(layout["tfhub"])
    removed = remove(cache_dir, tf)
    assert {r.kind for r in removed} == {"module", "descriptor"}
    assert not (cache_dir / tf).exists()


def test_remove_breaks_a_dead_lock(cache_dir: Path, layout: dict[str, str]) -> None:
    add_entry(cache_dir, layout["dead"])  # an entry, and the dead download's lock beside it
    removed = remove(cache_dir, layout["dead"])
    assert {r.kind for r in removed} == {"module", "descriptor", "manifest", "tmp", "lock"}
    assert not any(n.startswith(key(layout["dead"])) for n in names(cache_dir))


def test_remove_refuses_while_downloading(cache_dir: Path, layout: dict[str, str]) -> None:
    add_entry(cache_dir, layout["live"])
    with pytest.raises(CacheError, match=r"being downloaded \(held by pid"):
        remove(cache_dir, layout["live"])
    assert (cache_dir / key(layout["live"])).is_dir()


def test_remove_unknown(cache_dir: Path, layout: dict[str, str]) -> None:
    with pytest.raises(CacheError, match="no cache entry for 'https://nowhere/1'"):
        remove(cache_dir, "https://nowhere/1")


# -- with the real writer ------------------------------------------------------------------


@pytest.mark.anyio
async def test_tools_read_what_the_hub_writes(cache_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(tar_bytes(make_module(tmp_path / "src")))
    async with AsyncHub(cache_dir=cache_dir) as hub:
        path = await hub.resolve(archive)
    [entry] = list_entries(cache_dir)
    assert (entry.handle, entry.path, entry.complete, entry.has_manifest) == (
        str(archive),
        path,
        True,
        True,
    )
    assert [c.complete for c in verify(cache_dir)] == [True]
    (path / "saved_model.pb").unlink()
    [check] = verify(cache_dir)
    assert check.missing == ["saved_model.pb"]
    assert len(remove(cache_dir, str(archive))) == 3
    assert list(cache_dir.iterdir()) == []
