"""One big archive through ``s3://`` (moto's server) beside the same bytes over http.

Both servers run on 127.0.0.1 in processes of their own: moto's S3 server
(Python, werkzeug) and ``python -m http.server``. Each round resolves the
archive once through each, into a fresh cache, in alternating order; and, to
show where the time goes, reads it once more through each without extracting
(obstore's stream, httpx's stream, bytes discarded). Figures are MB/s of the
archive (compressed bytes), median [min, max] over the rounds.

    python -m benchmarks.bench_objstore                 # ~200 MB, 5 rounds
    python -m benchmarks.bench_objstore --size 50 --rounds 3

Needs the dev extra (moto[server], obstore, numpy for the weights). Not
registered in ``benchmarks/__main__.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httpx

from ._work import MB, static_server, tree_bytes, write_random_module

_MOTO = r"""
import json, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(json.dumps({"port": server.get_host_and_port()[1]}), flush=True)
sys.stdin.read()
server.stop()
"""


@contextlib.contextmanager
def moto() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        yield f"http://127.0.0.1:{port}"
    finally:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


async def _resolve(cache: Path, handle: str) -> Path:
    from asynchub import AsyncHub

    async with AsyncHub(cache_dir=cache) as hub:
        return await hub.resolve(handle)


async def _raw_s3(bucket: str, key: str) -> int:
    import obstore

    store = obstore.store.S3Store(bucket)
    result = await obstore.get_async(store, key)
    n = 0
    async for chunk in result.stream(min_chunk_size=MB):
        n += len(chunk)
    return n


async def _raw_http(url: str) -> int:
    n = 0
    async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            n += len(chunk)
    return n


def _timed(func: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    anyio.run(func)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200, help="weights, MB (default 200)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="asynchub-bench-objstore-"))
    try:
        www = work / "www"
        www.mkdir()
        archive = www / "m.tar.gz"
        write_random_module(archive, args.size * MB)
        size = archive.stat().st_size
        expected = None
        with moto() as endpoint, static_server(www) as base:
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_REGION="us-east-1",
                AWS_ALLOW_HTTP="true",
            )
            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            s3.upload_file(str(archive), "bench", "m.tar.gz")
            url = f"{base}/m.tar.gz"
            cases: dict[str, Callable[[Path], Callable[[], Awaitable[object]]]] = {
                "resolve s3:// (obstore)": lambda c: lambda: _resolve(c, "s3://bench/m.tar.gz"),
                "resolve http:// (httpx)": lambda c: lambda: _resolve(c, url),
                "read only s3:// (obstore)": lambda c: lambda: _raw_s3("bench", "m.tar.gz"),
                "read only http:// (httpx)": lambda c: lambda: _raw_http(url),
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            names = list(cases)
            for round_ in range(args.rounds + 1):  # round 0 warms up (page cache, imports)
                order = names[round_ % 2 :] + names[: round_ % 2]
                for name in order:
                    cache = work / f"cache-{round_}-{names.index(name)}"
                    seconds = _timed(cases[name](cache))
                    if cache.exists():
                        [entry] = [p for p in cache.iterdir() if p.is_dir()]
                        got = tree_bytes(entry)
                        expected = expected or got
                        if got != expected:
                            raise RuntimeError(f"{name}: {got:,} bytes extracted, not {expected:,}")
                        shutil.rmtree(cache)
                    if round_:
                        samples[name].append(size / MB / seconds)
        print(f"archive: {size / MB:.0f} MB compressed, {args.rounds} rounds, MB/s of the archive")
        print("| case | median | min | max |")
        print("| --- | --- | --- | --- |")
        for name, values in samples.items():
            print(
                f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} "
                f"| {max(values):.0f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
