"""A cache hit without a hub (asynchub._lookup.cached), and what it spares a process.

``cached`` is what ``asynchub.ray.Predictor`` does first in each actor: it must
answer exactly as :meth:`AsyncHub.lookup` does for every handle the hub would
answer from the cache, and fall back (None) wherever the hub would raise or
report, so the full path keeps its errors. A process that finds its module in
the cache then never imports httpx or the download machinery.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import asynchub
from asynchub import AsyncHub, HubError
from asynchub._handles import parse
from asynchub._lookup import cached
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests._procs import run_fresh


async def hub_says(handle: str, **options: Any) -> Path | str | None:
    """What the hub's own lookup answers: a path, None, or the error it raises."""
    async with AsyncHub(**options) as hub:
        try:
            return await hub.lookup(handle)
        except HubError as exc:
            return type(exc).__name__


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cached_answers_as_the_hub_does(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "m", weights=4_000)
    body = tar_bytes(module)
    url = server.add("/m/1", body=body)
    missing = server.add("/other/1", body=body)
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(body)
    async with AsyncHub() as hub:
        await hub.resolve(url)
        await hub.resolve(str(archive))
        entry = await hub.lock_entry(url)
    lockfile = tmp_path / "asynchub.lock"
    lockfile.write_text(json.dumps({"format": "asynchub.lock/1", "modules": {}}))
    from asynchub._integrity import write_lock

    write_lock(lockfile, [entry])
    assert entry.sha256 is not None
    right, wrong = entry.sha256, "0" * 64
    cases: list[tuple[str, dict[str, Any], bool]] = [
        # (handle, options, the hub answers from the cache)
        (url, {}, True),
        (url.upper().replace("HTTP://", "http://", 1), {}, False),  # another key
        (missing, {}, False),
        (f"{url}#sha256={right}", {}, True),
        (f"{url}#sha256={wrong}", {}, False),
        (str(module), {}, True),  # a directory: used in place
        (str(archive), {}, True),
        (str(tmp_path / "nowhere"), {}, False),  # HandleError
        ("http://127.0.0.1:99999/m", {}, False),  # a port out of range: HandleError
        ("ftp://example.com/m", {}, False),
        (url, {"lockfile": lockfile}, True),
        (missing, {"lockfile": lockfile}, False),  # not in the lock file: IntegrityError
        (url, {"cache_dir": tmp_path / "empty"}, False),
    ]
    for handle, options, hit in cases:
        hub_answer = await hub_says(handle, **options)
        answer = cached(handle, options)
        if hit:
            assert isinstance(hub_answer, Path), (handle, options, hub_answer)
            assert answer == hub_answer, (handle, options)
        else:
            assert not isinstance(hub_answer, Path), (handle, options, hub_answer)
            assert answer is None, (handle, options, answer)

    # An archive touched since it was unpacked is a miss for both.
    os.utime(archive, ns=(1, 1))
    assert await hub_says(str(archive)) is None
    assert cached(str(archive), {}) is None


def test_cached_leaves_reporting_and_bad_options_to_the_hub(
    server: Server, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m/1", body=tar_bytes(make_module(tmp_path / "m", weights=1_000)))
    path = asynchub.resolve(url)
    assert cached(url, {}) == path
    # A hit is reported as a "cached" event: the hub's to report.
    assert cached(url, {"progress": lambda event: None}) is None
    monkeypatch.setenv("TFHUB_DOWNLOAD_PROGRESS", "1")
    assert cached(url, {}) is None
    monkeypatch.delenv("TFHUB_DOWNLOAD_PROGRESS")
    # Options are read as the hub reads them: the same errors.
    with pytest.raises(TypeError, match="unknown hub option"):
        cached(url, {"cach_dir": tmp_path})
    with pytest.raises(asynchub.ConfigError, match="timeout"):
        cached(url, {"timeout": -1})
    # Objects of the caller's that a hit does not use are ignored.
    assert cached(url, {"keep_alive": False, "transport": None}) == path


def test_a_lax_parse_differs_only_in_what_httpx_would_refuse() -> None:
    bad = "http://exa\x01mple.com/m"
    with pytest.raises(asynchub.HandleError, match="malformed URL"):
        parse(bad)
    assert parse(bad, strict=False).kind.name == "URL"
    good = "https://example.com/models/m/1#sha256=" + "a" * 64
    assert parse(good, strict=False) == parse(good)
    for bad_port in ("http://example.com:x/m", "http://:80/m"):
        for strict in (True, False):
            with pytest.raises(asynchub.HandleError):
                parse(bad_port, strict=strict)


def test_a_process_that_finds_its_module_cached_imports_no_http_client(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    """What a warm Ray actor does: import asynchub.ray, find the module, look no further."""
    url = server.add("/m/1", body=tar_bytes(make_module(tmp_path / "m", weights=1_000)))
    path = asynchub.resolve(url)
    code = f"""
import json, sys
import asynchub.ray
from asynchub._lookup import cached
found = cached({url!r}, {{}})
print(json.dumps([str(found), sorted(m for m in ("httpx", "httpcore", "asynchub._hub",
    "asynchub._fetch", "asynchub._sync") if m in sys.modules)]))
"""
    found, imported = run_fresh(code, TFHUB_CACHE_DIR=str(cache_dir))
    assert found == str(path)
    assert imported == []
    # The miss and the full path still import what they need.
    code_miss = f"""
import json, sys
import asynchub
print(json.dumps([str(asynchub.resolve({url!r})), "httpx" in sys.modules]))
"""
    fetched, httpx_imported = run_fresh(code_miss, TFHUB_CACHE_DIR=str(tmp_path / "other-cache"))
    assert Path(fetched).name == path.name
    assert httpx_imported is True
