"""One archive over several connections: byte ranges fetched at once, extracted in order.

Every test downloads from a real origin on 127.0.0.1 that speaks ``Range``
(``bytes=a-b``), ``If-Range``, a strong ``ETag`` and ``Accept-Ranges``, and
misbehaves on demand: it cuts a range, stalls one, answers a range with the
whole archive, changes the archive in the middle (honouring ``If-Range``, or
ignoring it). Each must end in the right module — never two versions spliced —
or in an error that names the handle, and leave nothing but the entry behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

import asynchub
from asynchub import AsyncHub, Hub, NetworkError, Retries, Timeouts
from asynchub._config import HubConfig
from asynchub._fetch import ranged
from asynchub._fetch.ranged import auto_connections, pieces
from asynchub._progress import ProgressEvent, ProgressKind
from asynchub._sources.http import Validators, range_answer
from asynchub.cli import main as cli
from tests._archives import make_module, tar_bytes, tree

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

#: asyncio's one-shot cancellations (asyncio.timeout, TaskGroup) are 3.11's.
needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout, TaskGroup")

MiB = 1024 * 1024
FAST = Retries(total=3, backoff=0.01, max_backoff=0.05)
STOP_WITHIN = 5.0


# -- the origin ------------------------------------------------------------------------


@dataclass
class Origin:
    """What the origin serves at ``/m``, and how it misbehaves (each fault once unless said)."""

    body: bytes
    #: Bytes/s per answer (0: as fast as it goes).
    rate: float = 0.0
    ranges: bool = True
    #: From the first Range request on, serve this version (its own ETag).
    new_body: bytes | None = None
    honour_if_range: bool = True
    #: Answer Range requests with the whole archive and a 200.
    ranges_as_200: bool = False
    #: Close the first answer to a Range request not starting at 0 after this many bytes.
    cut_range_after: int | None = None
    #: Stop sending the first answer to a Range request not starting at 0 after
    #: 64 KiB, for this many seconds.
    stall_range_for: float = 0.0
    stall_every_range: bool = False
    #: Answer the first Range request not starting at 0 with this status (a 503, say).
    fail_range_with: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    #: The same for Range requests not starting at 0. A first stream the client
    #: stopped reading stays active here until a write fails, so a worker that took
    #: its place can be counted beside it; its ranges' count has no such lag.
    active_ranges: int = 0
    max_active_ranges: int = 0
    redirected: int = 0  #: GETs of /r, answered with a redirect to /m

    def ranges_asked(self) -> list[str]:
        return [h["Range"] for h in self.requests if "Range" in h]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    origin: Origin
    stopping: threading.Event
    lock: threading.Lock

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha1(body).hexdigest() + '"'


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv = self.server
        o = srv.origin
        if self.path.startswith("/r"):  # a redirect to the archive
            self.send_response(302)
            self.send_header("Location", "/m")
            self.send_header("Content-Length", "0")
            self.end_headers()
            with srv.lock:
                o.redirected += 1
            return
        ranged = not self.headers.get("Range", "bytes=0-").startswith("bytes=0-")
        with srv.lock:
            o.requests.append(dict(self.headers.items()))
            o.active += 1
            o.max_active = max(o.max_active, o.active)
            o.active_ranges += ranged
            o.max_active_ranges = max(o.max_active_ranges, o.active_ranges)
        try:
            self._answer(o, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with srv.lock:
                o.active -= 1
                o.active_ranges -= ranged

    def _answer(self, o: Origin, head: bool) -> None:
        srv = self.server
        asked = self.headers.get("Range") if o.ranges else None
        with srv.lock:
            if asked and o.new_body is not None:
                o.body, o.new_body = o.new_body, None
            body = o.body
        etag = _etag(body)
        if asked and not asked.startswith("bytes=0-") and o.fail_range_with is not None:
            with srv.lock:
                failed, o.fail_range_with = o.fail_range_with, None
            if failed is not None:
                self.send_response(failed)
                self.send_header("Content-Length", "0")
                self.send_header("Retry-After", "0")
                self.end_headers()
                return
        start, end, status = 0, len(body), 200
        if asked and not o.ranges_as_200:
            if_range = self.headers.get("If-Range")
            if not o.honour_if_range or if_range is None or if_range == etag:
                low, _, high = asked.removeprefix("bytes=").partition("-")
                start = int(low)
                end = min(len(body), int(high) + 1) if high else len(body)
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", etag)
        if o.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        self.end_headers()
        if head:
            return
        cut = stall = None
        if status == 206 and start > 0:
            with srv.lock:
                if o.cut_range_after is not None:
                    cut, o.cut_range_after = o.cut_range_after, None
                if o.stall_range_for:
                    stall = o.stall_range_for
                    if not o.stall_every_range:
                        o.stall_range_for = 0.0
        began = time.monotonic()
        pos = start
        limit = end if cut is None else min(end, start + cut)
        while pos < limit:
            if stall is not None and pos - start >= 64 * 1024:
                self.wfile.flush()
                if srv.stopping.wait(stall):
                    return
                stall = None
            piece = body[pos : min(limit, pos + 64 * 1024)]
            self.wfile.write(piece)
            pos += len(piece)
            if o.rate:
                # Paced: never ahead of rate since this answer began.
                ahead = (pos - start) / o.rate - (time.monotonic() - began)
                if ahead > 0 and srv.stopping.wait(ahead):
                    return
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True


@contextlib.contextmanager
def serving(origin: Origin) -> Iterator[str]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.origin = origin
    srv.stopping = threading.Event()
    srv.lock = threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = srv.server_address[:2]
        yield f"http://{host}:{port}/m"
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# -- archives ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modules")
    return {
        "a": make_module(root / "a", weights=12 * MiB, seed=1),
        "b": make_module(root / "b", weights=12 * MiB, seed=2),
        "big": make_module(root / "big", weights=40 * MiB, seed=3),
    }


@pytest.fixture(scope="module")
def archives(modules: dict[str, Path]) -> dict[str, bytes]:
    # Plain tar: as big as its weights, and made in no time.
    return {name: tar_bytes(path, gz=False) for name, path in modules.items()}


def entries(cache_dir: Path) -> list[str]:
    """What the cache holds beyond complete entries: a tmp dir, a lock, a stray file."""
    if not cache_dir.is_dir():
        return []
    names = sorted(p.name for p in cache_dir.iterdir())
    keys = {n for n in names if "." not in n}
    extra = [
        n
        for n in names
        if n not in keys
        and not any(n in (f"{k}.descriptor.txt", f"{k}.manifest.json") for k in keys)
    ]
    return extra


def assert_only_entry(cache_dir: Path, module: Path, path: Path) -> None:
    assert tree(path) == tree(module)
    assert entries(cache_dir) == []
    # No spill file or anything else of the download inside the module either.
    assert sorted(tree(path)) == sorted(tree(module))


def hub(cache_dir: Path, **options: object) -> AsyncHub:
    options.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **options)  # type: ignore[arg-type]


# -- pure parts ------------------------------------------------------------------------


def test_pieces_cover_the_rest_once_in_order() -> None:
    cut = pieces(0, 100 * MiB + 7, 8)
    assert cut[0][0] == 0 and cut[-1][1] == 100 * MiB + 7
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cut))
    sizes = [b - a for a, b in cut]
    # Small first (the extractor is fed at once), larger after, never past the bounds.
    assert sizes[0] == ranged.FIRST_PIECE and max(sizes) > 2 * sizes[0]
    assert all(ranged.FIRST_PIECE <= size <= ranged.MAX_PIECE for size in sizes[:-1])
    assert pieces(5, 5, 4) == []
    assert pieces(0, 1000, 4) == [(0, 1000)]  # one piece: not worth splitting


def test_the_automatic_choice() -> None:
    # A stream far slower than the target is split over many connections...
    assert auto_connections(25e6, 170 * MiB) == ranged.AUTO_MAX
    # ... one a little slower over a few; one as fast as the target not at all.
    assert 1 < auto_connections(ranged.AUTO_TARGET / 2.5, 170 * MiB) < ranged.AUTO_MAX
    assert auto_connections(ranged.AUTO_TARGET, 170 * MiB) == 1
    # Small archives are one stream, however slow.
    assert auto_connections(1e6, ranged.AUTO_MIN_BYTES - 1) == 1


FIRST = Validators(etag='"v1"', total=1000, ranges=True)


def test_range_answers() -> None:
    ok = {"etag": '"v1"', "content-range": "bytes 100-199/1000", "content-length": "100"}
    assert range_answer(FIRST, 206, ok, 100, 200) == "ok"
    assert range_answer(FIRST, 206, {**ok, "etag": '"v2"'}, 100, 200) == "changed"
    assert range_answer(FIRST, 206, {**ok, "content-range": "bytes 100-199/999"}, 100, 200) == (
        "changed"
    )
    assert range_answer(FIRST, 206, {**ok, "content-range": "bytes 0-99/1000"}, 100, 200) == (
        "wrong"
    )
    whole = {"etag": '"v1"', "content-length": "1000"}
    assert range_answer(FIRST, 200, whole, 100, 200) == "ignored"
    assert range_answer(FIRST, 200, {**whole, "etag": '"v2"'}, 100, 200) == "changed"
    assert range_answer(FIRST, 412, {}, 100, 200) == "changed"
    assert range_answer(FIRST, 503, {}, 100, 200) == "wrong"


def test_the_option_is_declared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCHUB_CONNECTIONS", raising=False)
    assert HubConfig.from_env(cache_dir="/c").connections is None
    assert HubConfig.from_env(cache_dir="/c", connections=3).connections == 3
    assert HubConfig.from_env(cache_dir="/c", connections="auto").connections is None
    monkeypatch.setenv("ASYNCHUB_CONNECTIONS", "5")
    assert HubConfig.from_env(cache_dir="/c").connections == 5
    assert HubConfig.from_env(cache_dir="/c", connections=1).connections == 1
    monkeypatch.setenv("ASYNCHUB_CONNECTIONS", "many")
    with pytest.raises(asynchub.ConfigError, match=r"ASYNCHUB_CONNECTIONS.*'many'"):
        HubConfig.from_env(cache_dir="/c")
    with pytest.raises(asynchub.ConfigError, match="connections must be >= 1"):
        HubConfig.from_env(cache_dir="/c", connections=0)


# -- the right module ------------------------------------------------------------------


@pytest.mark.anyio
async def test_ranges_make_the_module(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"])
    events: list[ProgressEvent] = []
    with serving(origin) as url:
        async with hub(cache_dir, connections=4, progress=events.append) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    asked = origin.ranges_asked()
    assert len(asked) >= 2 and all(r.startswith("bytes=") and r[-1] != "-" for r in asked)
    assert 1 < origin.max_active <= 4
    assert all(h.get("If-Range") == _etag(archives["a"]) for h in origin.requests if "Range" in h)
    # Progress counts every range, up to the whole archive.
    done = [e.done for e in events if e.kind is ProgressKind.DOWNLOADING]
    assert max(done) == len(archives["a"]) and done == sorted(done)


@pytest.mark.anyio
async def test_ranges_go_where_the_redirect_led(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"])
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url.replace("/m", "/r"))
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.ranges_asked() and origin.redirected == 1


@pytest.mark.anyio
async def test_one_connection_is_one_stream(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], rate=40e6)
    with serving(origin) as url:
        async with hub(cache_dir, connections=1) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.ranges_asked() == [] and len(origin.requests) == 1


@pytest.mark.anyio
async def test_early_pieces_wait_in_a_file_past_the_memory_bound(
    cache_dir: Path,
    modules: dict[str, Path],
    archives: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no memory for early pieces, every one waits in the (unnamed) spill file."""
    monkeypatch.setattr(ranged, "MEMORY", 0)
    origin = Origin(archives["a"], rate=30e6)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)


@pytest.mark.anyio
async def test_workers_stay_within_reach_of_the_extractor(
    cache_dir: Path,
    modules: dict[str, Path],
    archives: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a window of one piece, a worker waits for the extractor rather than run ahead."""
    monkeypatch.setattr(ranged, "AHEAD", ranged.FIRST_PIECE)
    origin = Origin(archives["a"], rate=30e6)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)


@pytest.mark.anyio
async def test_a_slow_large_archive_is_split_by_default(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    """Automatic: a stream far slower than the target is joined by more connections."""
    origin = Origin(archives["big"], rate=20e6)
    with serving(origin) as url:
        async with hub(cache_dir) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["big"], path)
    assert origin.ranges_asked() and origin.max_active > 1


@pytest.mark.anyio
async def test_a_small_archive_is_one_stream_by_default(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], rate=10e6)
    with serving(origin) as url:
        async with hub(cache_dir) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.ranges_asked() == []


# -- faults ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cut_range_is_resumed_alone(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], cut_range_after=1 * MiB)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    asked = origin.ranges_asked()
    starts = [int(r[6:].split("-")[0]) for r in asked]
    # The cut range resumed where it stopped; nothing restarted.
    assert any(start + 1 * MiB in starts for start in starts)
    assert sum(1 for h in origin.requests if "Range" not in h) == 1


@pytest.mark.anyio
async def test_a_range_answered_503_is_asked_again_alone(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], fail_range_with=503)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.fail_range_with is None  # it did fail one
    assert sum(1 for h in origin.requests if "Range" not in h) == 1


@pytest.mark.anyio
async def test_a_stalled_range_is_resumed_alone(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], stall_range_for=30.0)
    timeouts = Timeouts(connect=5, read=0.5, stalled=10)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4, timeout=timeouts) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert sum(1 for h in origin.requests if "Range" not in h) == 1


@pytest.mark.anyio
async def test_a_range_that_keeps_stalling_is_given_up_on(
    cache_dir: Path, archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], stall_range_for=30.0, stall_every_range=True)
    timeouts = Timeouts(connect=5, read=0.3, stalled=1.0)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4, timeout=timeouts) as h:
            with pytest.raises(NetworkError, match=r"stalled.*giving up") as caught:
                await h.resolve(url)
    assert url in str(caught.value)
    assert entries(cache_dir) == [] and not any(cache_dir.glob("*/"))


@pytest.mark.anyio
async def test_a_changed_archive_restarts_never_splices(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    """The archive changes mid-download; the server honours If-Range (a 200 of the new one)."""
    origin = Origin(archives["a"], new_body=archives["b"])
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["b"], path)


@pytest.mark.anyio
async def test_a_server_ignoring_if_range_is_never_spliced(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    """The archive changes and the server sends the new one's ranges: another ETag, a restart."""
    origin = Origin(archives["a"], new_body=archives["b"], honour_if_range=False)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["b"], path)
    assert sum(1 for h in origin.requests if "Range" not in h) == 2


@pytest.mark.anyio
async def test_a_200_to_a_range_falls_back_to_one_stream(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"], ranges_as_200=True)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4, retries=0) as h:
            path = await h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    # The attempt over ranges was dropped, and one stream fetched the archive.
    assert [h for h in origin.requests if "Range" not in h][-1] == origin.requests[-1]


@pytest.mark.anyio
async def test_per_host_limit_bounds_connections_of_many_downloads(
    cache_dir: Path,
    tmp_path: Path,
    archives: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ranged, "HOST_CONNECTIONS", 3)
    origin = Origin(archives["a"], rate=40e6)
    with serving(origin) as url:
        async with hub(cache_dir, connections=4, max_concurrency=3) as h:
            await h.prefetch([f"{url}?n={i}" for i in range(3)])
    # Three first streams, and ranged requests at most as many as one archive may
    # have (4, more than the host's 3), where each archive's own 4 would make 12.
    assert origin.ranges_asked()
    assert origin.max_active <= 3 + 4
    assert entries(cache_dir) == []


# -- the other ways in: sync facade, command line ---------------------------------------


def test_sync_hub_takes_connections(
    cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"])
    with serving(origin) as url, Hub(cache_dir=cache_dir, connections=3) as h:
        path = h.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.ranges_asked() and origin.max_active_ranges <= 3


def test_module_level_helpers_read_asynchub_connections(
    cache_dir: Path,
    modules: dict[str, Path],
    archives: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    origin = Origin(archives["a"])
    monkeypatch.setenv("ASYNCHUB_CONNECTIONS", "3")
    with serving(origin) as url:
        path = asynchub.resolve(url)
    assert_only_entry(cache_dir, modules["a"], path)
    assert origin.ranges_asked() and origin.max_active_ranges <= 3


@pytest.mark.parametrize("command", ["resolve", "prefetch"])
def test_cli_connections(
    command: str, cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    origin = Origin(archives["a"])
    with serving(origin) as url:
        result = CliRunner().invoke(cli, [command, "-q", "--connections", "3", url])
        assert result.exit_code == 0, result.output
        bad = CliRunner().invoke(cli, [command, "-q", "--connections", "0", url + "?x"])
    assert origin.ranges_asked() and origin.max_active_ranges <= 3
    assert bad.exit_code == 1 and "connections must be >= 1" in bad.output
    assert entries(cache_dir) == []


# -- cancellation during a ranged download -----------------------------------------------


@pytest.fixture
def stalled_range(archives: dict[str, bytes]) -> Iterator[str]:
    """Ranges that stall for a minute after 64 KiB: a download that cannot end by itself."""
    origin = Origin(archives["a"], stall_range_for=60.0, stall_every_range=True)
    with serving(origin) as url:
        yield url


def started(cache_dir: Path) -> bool:
    return cache_dir.is_dir() and any(p.name.endswith(".tmp") for p in cache_dir.iterdir())


@needs_311
def test_asyncio_timeout_stops_a_ranged_download(stalled_range: str, cache_dir: Path) -> None:
    async def main() -> None:
        async with hub(cache_dir, connections=4) as h:
            async with asyncio.timeout(1.0):
                await h.resolve(stalled_range)

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - began < STOP_WITHIN
    assert entries(cache_dir) == []


@needs_311
def test_a_failing_taskgroup_sibling_stops_a_ranged_download(
    stalled_range: str, cache_dir: Path
) -> None:
    async def main() -> None:
        async with hub(cache_dir, connections=4) as h:

            async def fail() -> None:
                while not started(cache_dir):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                raise KeyError("sibling")

            async with asyncio.TaskGroup() as tg:
                tg.create_task(h.resolve(stalled_range))
                tg.create_task(fail())

    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(main())
    assert caught.group_contains(KeyError)
    assert entries(cache_dir) == []


@pytest.mark.anyio
async def test_anyio_move_on_after_stops_a_ranged_download(
    stalled_range: str, cache_dir: Path
) -> None:
    began = time.monotonic()
    async with hub(cache_dir, connections=4) as h:
        with anyio.move_on_after(1.0) as scope:
            await h.resolve(stalled_range)
    assert scope.cancelled_caught
    assert time.monotonic() - began < STOP_WITHIN
    assert entries(cache_dir) == []


CTRL_C = """
import asyncio, sys
from asynchub import AsyncHub
async def main():
    async with AsyncHub(cache_dir=sys.argv[1], connections=4) as h:
        await h.resolve(sys.argv[2])
asyncio.run(main())
"""


def test_ctrl_c_stops_a_ranged_download(stalled_range: str, cache_dir: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CTRL_C), str(cache_dir), stalled_range],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not started(cache_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the ranges are under way
        began = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert time.monotonic() - began < STOP_WITHIN
    assert child.returncode != 0 and b"KeyboardInterrupt" in err
    assert entries(cache_dir) == []
    assert os.listdir(cache_dir) == [] or not any(cache_dir.glob("*.tmp"))


# -- object stores: obstore's ranged reads, if_match -----------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("store", ["s3", "gs"])
async def test_object_store_archive_over_ranges(
    store: str,
    request: pytest.FixtureRequest,
    cache_dir: Path,
    modules: dict[str, Path],
    archives: dict[str, bytes],
) -> None:
    server = request.getfixturevalue("s3" if store == "s3" else "gcs")
    handle = server.put(server.bucket(), "m.tar", archives["a"])
    events: list[ProgressEvent] = []
    async with hub(cache_dir, connections=4, progress=events.append) as h:
        path = await h.resolve(handle)
    assert_only_entry(cache_dir, modules["a"], path)
    done = [e.done for e in events if e.kind is ProgressKind.DOWNLOADING]
    assert max(done) == len(archives["a"])


@pytest.mark.anyio
async def test_s3_object_replaced_mid_download_restarts_never_splices(
    s3: Any, cache_dir: Path, modules: dict[str, Path], archives: dict[str, bytes]
) -> None:
    """Replaced after the first answer: the ranges' if_match fails, the download starts over."""
    bucket = s3.bucket()
    handle = s3.put(bucket, "m.tar", archives["a"])
    replaced = False

    def replace(event: ProgressEvent) -> None:
        nonlocal replaced
        if event.kind is ProgressKind.DOWNLOADING and not replaced:
            replaced = True
            s3.put(bucket, "m.tar", archives["b"])

    async with hub(cache_dir, connections=4, progress=replace) as h:
        path = await h.resolve(handle)
    assert replaced
    assert_only_entry(cache_dir, modules["b"], path)
