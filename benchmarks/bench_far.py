"""One archive from far away: an origin that caps each connection and answers a round trip late.

Real origins (object stores, CDNs) cap each connection — tens of MB/s per
stream is common — and answer each request a round trip later; loopback does
neither, so every other download figure here flatters one stream. The origin
here is a small HTTP server in a process of its own (its pacing must not share
the client's GIL), on 127.0.0.1: before each answer it sleeps ``latency``
seconds, then sends no faster than ``rate`` bytes/s per answer, with ``Range:
bytes=a-b`` (206, ``Content-Range``), ``If-Range``, a strong ``ETag``,
``Accept-Ranges`` and ``HEAD``, as object stores and CDNs do.

Rows: ``curl -s URL | tar xz`` (the baseline), ``aria2c -x8 -s8`` then ``tar
xzf`` (the download accelerator; n/a where Debian's ``aria2`` is missing),
tensorflow_hub's ``hub.resolve``, and ``AsyncHub.resolve`` with
``connections=1`` (one stream, as before) and with its defaults. Then the peak
RSS of a fresh process resolving the archive with the defaults.

Run the origin alone: ``python -m benchmarks.bench_far --serve ROOT [--rate B/s] [--latency s]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import _harness as h
from ._work import MB, Section, Work, log, run_checked, tree_bytes
from .bench_resolve import _expect, _extract_once, _fresh, curl_case, tfhub_case

RATE = 25_000_000  #: bytes/s per connection
LATENCY = 0.030  #: seconds before each answer
GOAL_ARIA2 = 1.3
GOAL_CURL = 5.0
GOAL_RSS_MIB = 256
CURL = "curl | tar xz"
ARIA2 = "aria2c -x8 -s8, then tar xzf"
TFHUB = "tensorflow_hub hub.resolve"
ONE = "asynchub, connections=1"
DEFAULT = "asynchub, defaults"


# -- the origin (its own process) -------------------------------------------------------


class _Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    rate: float
    latency: float

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Origin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        srv = self.server
        time.sleep(srv.latency)  # one round trip
        path = srv.root / unquote(urlsplit(self.path).path).lstrip("/")
        if not path.is_file() or srv.root not in path.resolve().parents:
            self.send_error(404)
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{stat.st_ino:x}-{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        start, end, status = 0, size, 200
        asked = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if asked.startswith("bytes=") and (if_range is None or if_range == etag):
            low, _, high = asked[6:].partition("-")
            try:
                start = int(low)
                end = min(size, int(high) + 1) if high else size
            except ValueError:
                start, end = 0, size
            else:
                if start >= size or end <= start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        began = time.monotonic()
        sent = 0
        with path.open("rb") as f, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            f.seek(start)
            while sent < end - start:
                piece = f.read(min(64 * 1024, end - start - sent))
                if not piece:
                    break
                self.wfile.write(piece)
                sent += len(piece)
                # Never ahead of the cap since the answer began.
                ahead = sent / srv.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
            self.wfile.flush()


def serve(root: Path, rate: float, latency: float) -> None:
    """Serve ``root`` on 127.0.0.1 (a free port, printed as ``port N``) until killed."""
    srv = _Origin(("127.0.0.1", 0), _Handler)
    srv.root, srv.rate, srv.latency = root.resolve(), rate, latency
    print(f"port {srv.server_address[1]}", flush=True)
    srv.serve_forever()


@contextlib.contextmanager
def far_origin(root: Path, rate: float = RATE, latency: float = LATENCY) -> Iterator[str]:
    """The far origin in a process of its own, serving ``root``; yields its base URL."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "benchmarks.bench_far", "--serve", str(root)),
            *("--rate", str(rate), "--latency", str(latency)),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the far origin did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- the cases ---------------------------------------------------------------------------

_CHILD = """
import json, sys, time
import anyio, asynchub

async def main():
    async with asynchub.AsyncHub(cache_dir=sys.argv[1]) as hub:
        return await hub.resolve(sys.argv[2])

started = time.perf_counter()
path = anyio.run(main)
seconds = time.perf_counter() - started
with open("/proc/self/status") as status:
    kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"path": str(path), "seconds": seconds, "peak_kib": kib}))
"""


def _cases(work: Work, url: str, size: int) -> dict[str, h.Measure]:
    cases: dict[str, h.Measure] = {CURL: curl_case(work, [url], 1, size)}
    aria2 = shutil.which("aria2c")
    if aria2 is not None:
        dest = work.root / "aria2"

        def fetch() -> list[Path]:
            run_checked(
                [
                    *(aria2, "-q", "-x8", "-s8", "-k1M", "--file-allocation=none"),
                    *("--allow-overwrite=true", "-d", str(dest), "-o", "m.tar.gz", url),
                ]
            )
            module = dest / "m"
            module.mkdir()
            run_checked(["tar", "xzf", str(dest / "m.tar.gz"), "-C", str(module)])
            return [module]

        cases[ARIA2] = h.once(fetch, setup=lambda: _fresh(dest), check=lambda p: _expect(p, size))
    cases[TFHUB] = tfhub_case(work, [url], size)
    cases[ONE] = _asynchub(work, url, size, connections=1)
    cases[DEFAULT] = _asynchub(work, url, size)
    return cases


def _asynchub(work: Work, url: str, size: int, connections: int | None = None) -> h.Measure:
    """A fresh ``AsyncHub(**options)`` resolving ``url`` into a fresh cache."""
    import anyio

    import asynchub

    cache = work.root / f"asynchub-far-{connections}"

    async def fetch() -> list[Path]:
        async with asynchub.AsyncHub(cache_dir=cache, connections=connections) as hub:
            return [await hub.resolve(url)]

    return h.once(
        lambda: anyio.run(fetch), setup=lambda: _fresh(cache), check=lambda p: _expect(p, size)
    )


def _peak_rss(work: Work, url: str) -> dict[str, float]:
    """A fresh process resolves ``url`` with the defaults: its peak RSS (VmHWM) and seconds."""
    cache = work.fresh_dir("far-rss")
    done = run_checked([sys.executable, "-c", _CHILD, str(cache), url])
    shutil.rmtree(cache)
    report: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def run(work: Work) -> list[Section]:
    if work.quick:
        archive, rate, latency, rounds = work.random_archive(48 * MB, seed=5), 50e6, 0.010, 1
    else:
        archive, rate, latency, rounds = work.random_archive(190 * MB, seed=5), RATE, LATENCY, 3
    nbytes = archive.stat().st_size
    size = tree_bytes(_extract_once(work, archive))
    www = work.fresh_dir("www-far")
    (www / "m.tar.gz").hardlink_to(archive)
    with far_origin(www, rate, latency) as base:
        url = f"{base}/m.tar.gz"
        cases = _cases(work, url, size)
        log(f"far: {nbytes / MB:.0f} MB, {rate / MB:.0f} MB/s a connection, {latency:.3f} s")
        samples = h.interleave(cases, rounds=rounds, warmup=1)
        rss = _peak_rss(work, url)
    shutil.rmtree(www)
    vs_curl = h.ratio_to(samples, CURL)
    vs_aria2 = h.ratio_to(samples, ARIA2) if ARIA2 in samples else None
    section = Section(
        title=f"Far origin: one archive of {nbytes / MB:.0f} MB, "
        f"{rate / MB:.0f} MB/s per connection, {latency * 1e3:.0f} ms per request",
        note=(
            "The origin (`benchmarks/bench_far.py`, a process of its own on 127.0.0.1) sleeps "
            f"{latency * 1e3:.0f} ms before each answer and sends each answer at most "
            f"{rate / MB:.0f} MB/s, with Range, If-Range, a strong ETag and Accept-Ranges. "
            "A fresh cache or directory each run. MB/s of archive bytes; ratios = speed ÷ the "
            "named row's in the same round, median [min, max]. `aria2c` is Debian's `aria2` "
            "(`-x8 -s8 -k1M`), then `tar xzf`: n/a where it is not installed. "
            f"Goals (defaults): >= {GOAL_ARIA2}x aria2c + tar, >= {GOAL_CURL}x curl | tar, "
            f"peak RSS <= {GOAL_RSS_MIB} MiB."
        ),
        columns=["case", "median s", "MB/s", "ratio vs curl", "ratio vs aria2c"],
    )
    labels = [CURL, ARIA2, TFHUB, ONE, DEFAULT]
    for label in labels:
        if label not in samples:
            section.rows.append([label, "n/a", "n/a", "n/a", "n/a (aria2c not installed)"])
            continue
        seconds = samples[label]
        mbps = h.Spread.of([nbytes / MB / s for s in seconds])
        versus = vs_aria2[label].fmt() if vs_aria2 is not None else "n/a"
        section.rows.append(
            [label, f"{h.Spread.of(seconds).median:.2f}", mbps.fmt(0), vs_curl[label].fmt(), versus]
        )
        section.data[label] = {
            "seconds": seconds,
            "mb_per_s": mbps.as_json(),
            "vs_curl": vs_curl[label].as_json(),
            "vs_aria2": vs_aria2[label].as_json() if vs_aria2 is not None else None,
        }
    peak = rss["peak_kib"] / 1024
    section.data["peak_rss_mib"] = peak
    section.data["settings"] = {"rate": rate, "latency": latency, "archive_bytes": nbytes}
    met = [
        f"{vs_aria2[DEFAULT].median:.2f}x aria2c + tar" if vs_aria2 is not None else "aria2c n/a",
        f"{vs_curl[DEFAULT].median:.2f}x curl | tar",
        f"peak RSS {peak:.0f} MiB (a fresh process, defaults, {rss['seconds']:.2f} s)",
    ]
    section.note += " Defaults: " + ", ".join(met) + "."
    return [section]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_far")
    parser.add_argument("--serve", type=Path, required=True, help="serve this directory")
    parser.add_argument("--rate", type=float, default=RATE, help="bytes/s per answer")
    parser.add_argument("--latency", type=float, default=LATENCY, help="seconds before each answer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.serve, args.rate, args.latency)


if __name__ == "__main__":
    main()
    os._exit(0)  # serving threads may still be pacing an answer: no need to wait
