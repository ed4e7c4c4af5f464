"""The prefetch/resolve/cache commands, each run as a real subprocess."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asynchub._cli import parse_duration
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server

REPO = Path(__file__).resolve().parents[1]
ENTRY = "from asynchub.cli import main; main(prog_name='asynchub')"


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``asynchub ARGS`` in a fresh interpreter; warnings are errors there too."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TFHUB_DOWNLOAD_PROGRESS", None)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", ENTRY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), done.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("modules")
    return [tar_bytes(make_module(root / f"m{i}", weights=20_000, seed=i)) for i in range(3)]


# -- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400),
     ("1d12h", 129600), (" 1.5h ", 5400), ("0s", 0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "-1d", "1d 2h", "1dd", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


# -- help -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["prefetch"], ["resolve"], ["cache"], ["cache", "ls"], ["cache", "rm"],
     ["cache", "prune"], ["cache", "verify"], ["cache", "path"]],
    ids=lambda c: " ".join(c) or "group",
)  # fmt: skip
def test_help(command: list[str]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: asynchub {' '.join(command)}".rstrip())


# -- prefetch / resolve --------------------------------------------------------------


def test_prefetch_reports_each_handle_and_fails_on_any_error(
    server: Server, cache_dir: Path, bodies: list[bytes], tmp_path: Path
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(3)]
    missing = server.add("/missing", status=404)
    handles = [urls[0], missing, urls[1], urls[0]]
    listing = tmp_path / "handles.txt"
    listing.write_text(f"# more handles\n\n{urls[2]}\n")
    done = cli("prefetch", *handles, "-j", "2", "--from-file", str(listing), "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["total"] == 4 and data["failed"] == 1
    results = data["results"]
    assert [r["handle"] for r in results] == [*handles, urls[2]]
    assert [r["ok"] for r in results] == [True, False, True, True, True]
    assert results[0]["path"] == str(cache_dir / key(urls[0])) == results[3]["path"]
    assert results[1] == {
        "handle": missing,
        "key": key(missing),
        "ok": False,
        "path": None,
        "error": results[1]["error"],
        "error_type": "HTTPStatusError",
    }
    assert "404" in results[1]["error"]
    assert all(Path(r["path"]).is_dir() for r in results if r["ok"])
    assert error_line(done) == "error: 1 of 4 handles failed"
    assert f"failed: {missing}: " in done.stderr
    # Not a terminal: plain progress lines on stderr.
    assert f"asynchub: done {urls[1]}: " in done.stderr
    assert len(server.gets("/m/0")) == 1


def test_prefetch_text_output_and_stdin(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    urls = [server.add(f"/m/{i}", body=bodies[i]) for i in range(2)]
    done = cli("prefetch", "--quiet", "--from-file", "-", stdin="\n".join(urls))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{cache_dir / key(u)}\t{u}" for u in urls]
    assert done.stderr == ""


def test_prefetch_needs_handles(cache_dir: Path) -> None:
    done = cli("prefetch")
    assert done.returncode == 2
    assert "no handles given" in done.stderr


def test_prefetch_offline_hit_and_miss(
    server: Server, cache_dir: Path, bodies: list[bytes]
) -> None:
    hit = server.add("/hit", body=bodies[0])
    miss = server.add("/miss", body=bodies[1])
    assert cli("prefetch", "-q", hit).returncode == 0
    requests = len(server.requests)
    done = cli("prefetch", "--offline", "-q", hit)
    assert done.returncode == 0 and done.stdout.startswith(str(cache_dir / key(hit)))
    done = cli("prefetch", "--offline", "-q", "--json", hit, miss)
    assert done.returncode == 1
    results = json.loads(done.stdout)["results"]
    assert [r["error_type"] for r in results] == [None, "OfflineError"]
    assert "offline mode is on" in results[1]["error"]
    assert len(server.requests) == requests


def test_resolve(server: Server, cache_dir: Path, bodies: list[bytes]) -> None:
    url = server.add("/m", body=bodies[0])
    done = cli("resolve", url, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{cache_dir / key(url)}\n"
    done = cli("resolve", url, "--json", "--offline", "--cache-dir", str(cache_dir))
    assert json.loads(done.stdout) == {"handle": url, "path": str(cache_dir / key(url))}


def test_resolve_failure_is_one_error_line(server: Server, cache_dir: Path) -> None:
    url = server.add("/missing", status=404)
    done = cli("resolve", "-q", url)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {url}: ") and "404" in line


# -- cache -------------------------------------------------------------------------------


@pytest.fixture
def fetched(server: Server, cache_dir: Path, bodies: list[bytes]) -> list[str]:
    urls = [server.add(f"/c/{i}", body=bodies[i]) for i in range(3)]
    done = cli("prefetch", "-q", *urls)
    assert done.returncode == 0, done.stderr
    return urls


def test_cache_path(cache_dir: Path, tmp_path: Path) -> None:
    assert cli("cache", "path").stdout == f"{cache_dir}\n"
    data = json.loads(cli("cache", "path", "--json", "--cache-dir", str(tmp_path)).stdout)
    assert data == {"cache_dir": str(tmp_path), "exists": True}


def test_cache_ls(cache_dir: Path, fetched: list[str]) -> None:
    data = json.loads(cli("cache", "ls", "--json").stdout)
    assert data["cache_dir"] == str(cache_dir)
    entries = data["entries"]
    assert [e["handle"] for e in entries] == sorted(fetched)
    assert set(entries[0]) == {
        "key", "handle", "path", "bytes", "fetched", "complete", "has_manifest", "locked"
    }  # fmt: skip
    assert all(e["complete"] and e["has_manifest"] and not e["locked"] for e in entries)
    assert all(e["key"] == key(e["handle"]) and e["bytes"] > 20_000 for e in entries)
    datetime.datetime.fromisoformat(entries[0]["fetched"])
    text = cli("cache", "ls")
    assert text.returncode == 0
    assert [line.split()[-1] for line in text.stdout.splitlines()] == sorted(fetched)
    assert "3 entries" in text.stderr


def test_cache_verify(cache_dir: Path, fetched: list[str]) -> None:
    done = cli("cache", "verify", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True
    (cache_dir / key(fetched[1]) / "variables" / "variables.index").unlink()
    done = cli("cache", "verify", "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["ok"] is False
    bad = [e for e in data["entries"] if not e["complete"]]
    assert [(e["handle"], e["missing"]) for e in bad] == [
        (fetched[1], ["variables/variables.index"])
    ]
    text = cli("cache", "verify")
    assert text.returncode == 1
    assert f"INCOMPLETE  {key(fetched[1])[:12]}  {fetched[1]}" in text.stdout
    assert "missing     variables/variables.index" in text.stdout


def test_cache_rm(cache_dir: Path, fetched: list[str]) -> None:
    k = key(fetched[0])
    done = cli("cache", "rm", fetched[0], "--dry-run", "--json")
    assert done.returncode == 0
    data = json.loads(done.stdout)
    assert data["dry_run"] is True and data["bytes"] > 20_000
    assert {r["kind"] for r in data["removed"]} == {"module", "descriptor", "manifest"}
    assert set(data["removed"][0]) == {"path", "kind", "key", "bytes", "reason"}
    assert (cache_dir / k).is_dir()
    done = cli("cache", "rm", k)
    assert done.returncode == 0
    assert f"removed module     {cache_dir / k}" in done.stdout
    assert not (cache_dir / k).exists()
    done = cli("cache", "rm", fetched[0])
    assert done.returncode == 1
    assert error_line(done).startswith(f"error: no cache entry for '{fetched[0]}'")


def test_cache_rm_refuses_a_live_download(cache_dir: Path, fetched: list[str]) -> None:
    import socket

    (cache_dir / f"{key(fetched[0])}.lock").write_text(f"{socket.gethostname()}.{os.getpid()}.ab")
    done = cli("cache", "rm", fetched[0])
    assert done.returncode == 1
    assert "is being downloaded" in error_line(done)
    assert (cache_dir / key(fetched[0])).is_dir()


def test_cache_prune(cache_dir: Path, fetched: list[str]) -> None:
    leftover = cache_dir / f"{key(fetched[0])}.deadbeef.tmp"
    make_module(leftover, weights=100)
    (cache_dir / key(fetched[2]) / "saved_model.pb").unlink()
    done = cli("cache", "prune", "--older-than", "30d", "--incomplete", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["dry_run"] is True
    assert {(r["kind"], r["key"]) for r in data["removed"]} == {
        ("tmp", key(fetched[0])),
        ("module", key(fetched[2])),
        ("descriptor", key(fetched[2])),
        ("manifest", key(fetched[2])),
    }
    assert leftover.exists()
    done = cli("cache", "prune", "--incomplete")
    assert done.returncode == 0
    assert "removed 4 paths" in done.stderr
    assert not leftover.exists() and not (cache_dir / key(fetched[2])).exists()
    assert (cache_dir / key(fetched[1])).is_dir()
    done = cli("cache", "prune", "--older-than", "0s", "--json")
    assert {r["key"] for r in json.loads(done.stdout)["removed"]} == {
        key(fetched[0]),
        key(fetched[1]),
    }
    assert list(cache_dir.iterdir()) == []


def test_cache_prune_rejects_a_bad_duration(cache_dir: Path) -> None:
    done = cli("cache", "prune", "--older-than", "soon")
    assert done.returncode == 2
    assert "invalid duration 'soon'" in done.stderr
