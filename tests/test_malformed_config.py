"""Malformed configuration is a clear error, never silently the default (issue 21).

Every environment variable asynchub reads and every hub option, given a value
it cannot use, raises ConfigError (a HubError and a ValueError) that names the
variable or option, the value, and what is allowed; every handle fragment
but one well-formed ``#sha256=`` is a HandleError. Tried through HubConfig,
AsyncHub (asyncio and trio), the sync Hub, the module-level helpers and the
command line.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asynchub
from asynchub import AsyncHub, ConfigError, HandleError, Hub, HubError, Retries, Timeouts
from asynchub._config import HubConfig
from asynchub._handles import parse
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server

REPO = Path(__file__).resolve().parents[1]
HEX = "ab" * 32
VARIABLES = (
    "ASYNCHUB_OFFLINE",
    "TFHUB_DOWNLOAD_PROGRESS",
    "ASYNCHUB_FILE_DIGESTS",
    "ASYNCHUB_GZIP",
    "ASYNCHUB_MIRRORS",
    "ASYNCHUB_LOCKFILE",
    "ASYNCHUB_MAX_EXTRACT_MEMBERS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))


def refused(exc: BaseException, *words: str) -> None:
    """A ConfigError whose message holds every word (the name, the value, what is allowed)."""
    assert isinstance(exc, ConfigError) and isinstance(exc, HubError), repr(exc)
    assert isinstance(exc, ValueError)
    for word in words:
        assert word in str(exc), (word, str(exc))


# -- environment variables ---------------------------------------------------------------

BOOLEAN_WORDS = ("1/0, true/false, yes/no or on/off",)

#: (variable, malformed value, words the message must hold)
MALFORMED_ENV = [
    ("ASYNCHUB_OFFLINE", "yes-please", BOOLEAN_WORDS),
    ("ASYNCHUB_OFFLINE", "2", BOOLEAN_WORDS),
    ("ASYNCHUB_OFFLINE", "tru", BOOLEAN_WORDS),
    ("TFHUB_DOWNLOAD_PROGRESS", "maybe", BOOLEAN_WORDS),
    ("ASYNCHUB_FILE_DIGESTS", "enabled", BOOLEAN_WORDS),
    ("ASYNCHUB_GZIP", "brotli", ("'isal', 'zlib-ng', 'zlib'",)),
    ("ASYNCHUB_GZIP", "gzip", ("'isal', 'zlib-ng', 'zlib'",)),
    ("ASYNCHUB_MIRRORS", "ftp://host/hub", ("s3://", "http(s)://", "local directory")),
    ("ASYNCHUB_MIRRORS", "https:///no-host", ("names no host",)),
    ("ASYNCHUB_MIRRORS", "s3://", ("names no bucket",)),
    ("ASYNCHUB_MIRRORS", "s3://ok-bucket,gs:///x", ("names no bucket",)),
    ("ASYNCHUB_MAX_EXTRACT_MEMBERS", "many", (">= 1 (a whole number",)),
    ("ASYNCHUB_MAX_EXTRACT_MEMBERS", "0", (">= 1 (a whole number",)),
    ("ASYNCHUB_MAX_EXTRACT_MEMBERS", "-5", (">= 1 (a whole number",)),
    ("ASYNCHUB_MAX_EXTRACT_MEMBERS", "1.5", (">= 1 (a whole number",)),
]


@pytest.mark.parametrize(("name", "value", "words"), MALFORMED_ENV)
def test_a_malformed_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: tuple[str, ...]
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(HubError) as ei:
        HubConfig.from_env()
    refused(ei.value, name, repr(value.split(",")[-1] if "," in value else value), *words)
    with pytest.raises(ConfigError, match=name):
        AsyncHub()
    with pytest.raises(ConfigError, match=name):
        Hub()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(t, True) for t in ("1", "true", "True", "TRUE", "yes", "YES", "on", "On", " 1 ")],
        *[(t, False) for t in ("0", "false", "False", "no", "NO", "off", "OFF", "", "  ")],
    ],
)
@pytest.mark.parametrize("name", ["ASYNCHUB_OFFLINE", "ASYNCHUB_FILE_DIGESTS"])
def test_boolean_variables_take_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, expected: bool
) -> None:
    monkeypatch.setenv(name, text)
    config = HubConfig.from_env()
    field = {"ASYNCHUB_OFFLINE": "offline", "ASYNCHUB_FILE_DIGESTS": "file_digests"}[name]
    assert getattr(config, field) is expected


def test_progress_variable_takes_the_usual_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, expected in (("ON", True), ("off", False), ("Yes", True), ("0", False)):
        monkeypatch.setenv("TFHUB_DOWNLOAD_PROGRESS", text)
        assert HubConfig.from_env().progress is expected


def test_well_formed_variables_still_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASYNCHUB_GZIP", " ZLIB ")
    monkeypatch.setenv("ASYNCHUB_MIRRORS", f"s3://b-1/p, https://m.example/hub, {tmp_path},")
    monkeypatch.setenv("ASYNCHUB_MAX_EXTRACT_MEMBERS", " 250 ")
    config = HubConfig.from_env()
    assert config.gzip_backend == "zlib"
    assert config.mirrors == ("s3://b-1/p", "https://m.example/hub", str(tmp_path))
    assert config.max_extract_members == 250


# -- keyword options ---------------------------------------------------------------------

NAN, INF = math.nan, math.inf

#: (option, malformed value, words the message must hold besides the option's name)
MALFORMED_OPTIONS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("retries", "abc", (">= 0 (a whole number",)),
    ("retries", -1, (">= 0 (a whole number",)),
    ("retries", 1.5, (">= 0 (a whole number",)),
    ("retries", True, (">= 0 (a whole number",)),
    ("max_concurrency", 0, ("must be >= 1",)),
    ("max_concurrency", -1, ("must be >= 1",)),
    ("max_concurrency", 2.5, ("must be >= 1",)),
    ("max_concurrency", "4", ("must be >= 1",)),
    ("timeout", -1, ("seconds > 0",)),
    ("timeout", 0, ("seconds > 0",)),
    ("timeout", "abc", ("seconds > 0",)),
    ("timeout", NAN, ("seconds > 0",)),
    ("timeout", INF, ("seconds > 0",)),
    ("timeout", True, ("seconds > 0",)),
    ("gzip_backend", "brotli", ("'isal', 'zlib-ng', 'zlib'",)),
    ("gzip_backend", 5, ("'isal', 'zlib-ng', 'zlib'",)),
    ("headers", "", ("mapping",)),
    ("headers", "Authorization: x", ("mapping",)),
    ("headers", [("a", "b")], ("mapping",)),
    ("headers", {"a": 1}, ("text",)),
    ("headers", {"bad name": "v"}, ("header name",)),
    ("headers", {"": "v"}, ("header name",)),
    ("headers", {"X-Ok": "a\r\nInjected: 1"}, ("line break",)),
    ("offline", "maybe", ("1/0, true/false, yes/no or on/off",)),
    ("offline", 2, ("1/0, true/false, yes/no or on/off",)),
    ("file_digests", "enabled", ("1/0, true/false, yes/no or on/off",)),
    ("max_extract_bytes", 0, (">= 1 (a whole number",)),
    ("max_extract_bytes", -5, (">= 1 (a whole number",)),
    ("max_extract_bytes", "big", (">= 1 (a whole number",)),
    ("max_extract_bytes", 1.5, (">= 1 (a whole number",)),
    ("max_extract_members", 0, (">= 1 (a whole number",)),
    ("max_extract_members", "many", (">= 1 (a whole number",)),
    ("lock_stale_after", -1, ("seconds > 0",)),
    ("lock_stale_after", 0, ("seconds > 0",)),
    ("lock_stale_after", "x", ("seconds > 0",)),
    ("lock_stale_after", NAN, ("seconds > 0",)),
    ("lock_timeout", -1, ("seconds >= 0",)),
    ("lock_timeout", "x", ("seconds >= 0",)),
    ("lock_timeout", NAN, ("seconds >= 0",)),
    ("mirrors", 5, ("list",)),
    ("mirrors", [5], ("list",)),
    ("mirrors", "ftp://x/y", ("s3://", "local directory")),
    ("mirrors", "https://", ("names no host",)),
    ("lockfile", 5, ("path",)),
    ("lockfile", "a\0b", ("NUL",)),
    ("cache_dir", 5, ("path",)),
    ("cache_dir", "a\0b", ("NUL",)),
    ("on_mirror_mismatch", "ignore", ("'raise' or 'origin'",)),
    ("s3_options", "endpoint=x", ("mapping",)),
    ("s3_options", {1: "x"}, ("mapping",)),
    ("gcs_options", [1], ("mapping",)),
]


def _id(case: tuple[str, Any, tuple[str, ...]]) -> str:
    return f"{case[0]}={case[1]!r}"


@pytest.mark.parametrize(
    ("option", "value", "words"), MALFORMED_OPTIONS, ids=map(_id, MALFORMED_OPTIONS)
)
def test_a_malformed_option_is_refused_naming_it(
    option: str, value: Any, words: tuple[str, ...]
) -> None:
    with pytest.raises(HubError) as ei:
        HubConfig.from_env(**{option: value})
    refused(ei.value, option, *words)
    if option not in SECRET:
        assert repr(value) in str(ei.value), str(ei.value)


#: Options whose values may hold credentials: their messages name a key, never a value.
SECRET = ("headers", "s3_options", "gcs_options")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Timeouts(connect=-1), ("Timeouts(connect=", "seconds > 0")),
        (lambda: Timeouts(read=0), ("Timeouts(read=", "seconds > 0")),
        (lambda: Timeouts(stalled=NAN), ("Timeouts(stalled=", "seconds > 0")),
        (lambda: Timeouts(read="15"), ("Timeouts(read=", "seconds > 0")),
        (lambda: Retries(total=-1), ("Retries(total=", ">= 0 (a whole number")),
        (lambda: Retries(total=2.5), ("Retries(total=", ">= 0 (a whole number")),
        (lambda: Retries(backoff=-0.5), ("Retries(backoff=", "seconds >= 0")),
        (lambda: Retries(max_backoff=INF), ("Retries(max_backoff=", "seconds >= 0")),
        (lambda: Retries(max_retry_after=-1), ("Retries(max_retry_after=", "seconds >= 0")),
    ],
)
def test_malformed_timeouts_and_retries_are_refused(make: Any, words: tuple[str, ...]) -> None:
    with pytest.raises(HubError) as ei:
        make()
    refused(ei.value, *words)


def test_well_formed_options_still_work(tmp_path: Path) -> None:
    config = HubConfig.from_env(
        retries=0,
        timeout=2,
        offline="no",
        file_digests="YES",
        max_extract_bytes=1,
        max_extract_members=1,
        lock_stale_after=0.5,
        lock_timeout=0,
        headers={},
        gzip_backend="zlib",
        mirrors=[],
        s3_options={},
        lockfile="",
    )
    assert config.retries == Retries(total=0) and config.timeouts == Timeouts.coerce(2.0)
    assert config.offline is False and config.file_digests is True
    assert (config.max_extract_bytes, config.max_extract_members) == (1, 1)
    assert (config.lock_stale_after, config.lock_timeout) == (0.5, 0)
    assert config.headers == {} and config.mirrors == () and config.lockfile is None
    # Defaults when not given, or None.
    default = HubConfig.from_env(max_extract_bytes=None, max_extract_members=None)
    assert default.max_extract_bytes == 64 * 1024**3
    assert default.max_extract_members == 100_000
    assert default.lock_stale_after == 600.0 and default.lock_timeout is None


def test_an_option_over_a_malformed_variable_still_refuses_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyword wins over its variable: the variable is not read then, so it cannot fail."""
    monkeypatch.setenv("ASYNCHUB_OFFLINE", "maybe")
    assert HubConfig.from_env(offline=True).offline is True
    with pytest.raises(ConfigError, match="ASYNCHUB_OFFLINE"):
        HubConfig.from_env()


# -- through the hub, on both back-ends, the sync facade, the helpers and the CLI --------


@pytest.mark.anyio
async def test_async_hub_refuses_before_any_request(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m", weights=100)))
    with pytest.raises(ConfigError, match=r"retries"):
        AsyncHub(cache_dir=tmp_path / "c", retries="3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"timeout"):
        AsyncHub(cache_dir=tmp_path / "c", timeout=-1)
    monkeypatch.setenv("ASYNCHUB_OFFLINE", "maybe")
    with pytest.raises(ConfigError, match="ASYNCHUB_OFFLINE"):
        await asynchub.aresolve(url)
    assert server.gets("/m") == []
    assert not (tmp_path / "c").exists()


def test_sync_hub_and_helpers_refuse(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m", weights=100)))
    with pytest.raises(ConfigError, match="max_concurrency"):
        Hub(cache_dir=tmp_path / "c", max_concurrency=0)
    monkeypatch.setenv("TFHUB_DOWNLOAD_PROGRESS", "maybe")
    with pytest.raises(ConfigError, match="TFHUB_DOWNLOAD_PROGRESS"):
        asynchub.resolve(url)
    monkeypatch.setenv("TFHUB_DOWNLOAD_PROGRESS", "0")
    monkeypatch.setenv("ASYNCHUB_GZIP", "brotli")
    with pytest.raises(ConfigError, match="ASYNCHUB_GZIP"):
        asynchub.resolve(url)
    assert server.gets("/m") == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("ASYNCHUB_OFFLINE", "yes-please"), ("ASYNCHUB_MIRRORS", "ftp://x/y")],
)
def test_the_command_line_reports_a_malformed_variable(
    server: Server, tmp_path: Path, name: str, value: str
) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m", weights=100)))
    env = {**os.environ, "PYTHONPATH": str(REPO), name: value}
    env.pop("TFHUB_DOWNLOAD_PROGRESS", None)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "asynchub", "prefetch", url],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last and repr(value) in last, done.stderr
    assert "Traceback" not in done.stderr
    assert server.gets("/m") == []


# -- handle fragments --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handle", "words"),
    [
        ("https://h.example/m/1#sha256=zz", ("64 hex digits",)),
        ("https://h.example/m/1#sha256=", ("64 hex digits",)),
        (f"https://h.example/m/1#sha256={HEX[:-1]}", ("64 hex digits",)),
        (f"https://h.example/m/1#sha256={HEX}#sha256={HEX}", ("twice",)),
        (f"https://h.example/m/1#sha256={HEX}#SHA256={HEX}", ("twice",)),
        (f"https://h.example/m/1#sha256={HEX}&size=3", ("64 hex digits",)),
        ("https://h.example/m/1#size=abc", ("fragment 'size=abc'", "#sha256=")),
        ("https://h.example/m/1#size=123", ("fragment 'size=123'", "#sha256=")),
        ("https://h.example/m/1#foo=1", ("fragment 'foo=1'", "#sha256=")),
        ("https://h.example/m/1#latest", ("fragment 'latest'", "#sha256=")),
        ("https://h.example/m/1#", ("fragment ''", "#sha256=")),
        (f"https://h.example/m/1#SHA256={HEX}", (f"fragment 'SHA256={HEX}'", "#sha256=")),
        (f"https://h.example/m/1#size=3#sha256={HEX}", ("fragment 'size=3'",)),
        ("s3://bucket-1/m.tar.gz#size=3", ("fragment 'size=3'", "#sha256=")),
        ("gs://bucket-1/dir/#version=2", ("fragment 'version=2'", "#sha256=")),
    ],
)
def test_malformed_handle_fragments_are_refused(handle: str, words: tuple[str, ...]) -> None:
    with pytest.raises(HandleError) as ei:
        parse(handle)
    assert ei.value.handle == handle
    assert handle in str(ei.value)
    for word in words:
        assert word in str(ei.value), (word, str(ei.value))


def test_a_file_url_fragment_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(tar_bytes(make_module(tmp_path / "m", weights=100)))
    handle = f"{archive.as_uri()}#size=3"
    with pytest.raises(HandleError, match=r"fragment 'size=3'"):
        parse(handle)
    assert parse(f"{archive.as_uri()}#sha256={HEX}").digest == HEX


def test_well_formed_fragments_and_hashes_in_names_still_work(tmp_path: Path) -> None:
    assert parse(f"https://h.example/m/1#sha256={HEX.upper()}").digest == HEX
    assert parse(f"https://h.example/m/1#sha256=sha256:{HEX}").digest == HEX
    assert parse("https://h.example/m/1").digest is None
    # A '#' is part of a local file's name, and of an object key when no fragment follows.
    archive = tmp_path / "v#2.tar.gz"
    archive.write_bytes(tar_bytes(make_module(tmp_path / "m", weights=100)))
    assert parse(str(archive)).path == archive
    assert parse(f"{archive}#sha256={HEX}").digest == HEX
    assert parse("s3://bucket-1/models/v#2.tar.gz").url == "s3://bucket-1/models/v#2.tar.gz"


@pytest.mark.anyio
async def test_a_malformed_fragment_fails_before_any_request(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m", weights=100)))
    async with AsyncHub(cache_dir=cache_dir) as h:
        for handle in (f"{url}#size=3", f"{url}#sha256={HEX}#sha256={HEX}"):
            with pytest.raises(HandleError):
                await h.resolve(handle)
    with Hub(cache_dir=cache_dir) as sync_hub, pytest.raises(HandleError, match="fragment"):
        sync_hub.resolve(f"{url}#latest")
    assert server.gets("/m") == []
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
