"""Prefetch throughput: 16 module archives of ~25 MB from a loopback server.

Compares resolving them one after another with ``prefetch`` at max_concurrency
1, 2, 4 and 8, in one run. Each configuration runs in a fresh interpreter with
an empty cache dir and reports wall time, CPU time (user+sys) and peak RSS
(``VmHWM``, and the RSS after imports); the server's own CPU time and what the
rest of the machine used meanwhile ("others": on shared cores, a busy
neighbour skews every figure) are measured around each run.

    python benchmarks/bench_prefetch.py                 # the test suite's server
    python benchmarks/bench_prefetch.py --server sendfile
    python benchmarks/bench_prefetch.py --weights float32 --repeat 3
    python benchmarks/bench_prefetch.py --processes 1 2   # also with 2 worker processes

``--server test`` is tests/_httpserver.py (pure Python, writes 64 KiB chunks);
``--server sendfile`` answers with ``socket.sendfile`` from archive files, so
the kernel copies the bytes and the server costs almost no CPU. Archives are
built once into ``--work`` and reused. ``--weights random`` (the default) makes
random bytes, which gzip stores uncompressed, so gunzip only copies;
``float32`` makes normally distributed float32 weights, as trained models
have: gzip saves about a tenth, and inflate does real work.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._archives import make_module  # noqa: E402
from tests._httpserver import Server  # noqa: E402

N_MODULES = 16
WEIGHTS = 25_000_000

_WORKER = textwrap.dedent(
    """
    import json, resource, sys, time, anyio, asynchub

    def cpu():
        # With processes=N the work is done in worker processes: count them too.
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            total += r.ru_utime + r.ru_stime
        return total

    def child_peak():
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    def status(field):
        # VmHWM is this process's own peak; ru_maxrss would also count the
        # parent's RSS at fork (kept across exec), i.e. the server's archives.
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    async def main(cache_dir, mode, processes, urls):
        base = status("VmRSS")
        async with asynchub.AsyncHub(
            cache_dir=cache_dir, max_concurrency=max(1, mode), retries=0
        ) as hub:
            t0, c0 = time.perf_counter(), cpu()
            if mode == 0:
                paths = [await hub.resolve(u) for u in urls]
            else:
                paths = await hub.prefetch(urls, max_concurrency=mode, processes=processes)
            wall, used = time.perf_counter() - t0, cpu() - c0
        assert len(paths) == len(urls)
        peak = status("VmHWM")
        workers = child_peak()  # the largest child process's peak RSS
        out = {"wall": wall, "cpu": used, "cpu_total": cpu(), "peak_rss": peak, "base_rss": base,
               "worker_peak_rss": workers}
        print(json.dumps(out))

    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    """
)


def build_archives(work: Path, weights: str) -> list[Path]:
    """Module archives ``m<i>.tar.gz`` in ``work/<weights>``, built once and reused."""
    out = work / weights
    out.mkdir(parents=True, exist_ok=True)
    archives = []
    for i in range(N_MODULES):
        archive = out / f"m{i}.tar.gz"
        if not archive.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src = make_module(Path(tmp) / "m", weights=WEIGHTS if weights == "random" else 1)
                if weights == "float32":
                    # Trained weights look like this: gzip saves ~10%, but inflate has real work.
                    import numpy as np

                    rng = np.random.default_rng(i)
                    data = rng.standard_normal(WEIGHTS // 4, dtype=np.float32).tobytes()
                    (src / "variables" / "variables.data-00000-of-00001").write_bytes(data)
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
                    tar.add(src, arcname=".")
                archive.write_bytes(buf.getvalue())
        archives.append(archive)
    return archives


class _SendfileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.root / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.flush()
        with path.open("rb") as fh:
            self.connection.sendfile(fh)


@contextlib.contextmanager
def serve(kind: str, archives: list[Path]) -> Iterator[list[str]]:
    if kind == "test":
        server = Server().start()
        try:
            urls = [server.add(f"/{a.name}", body=a.read_bytes()) for a in archives]
            yield urls
        finally:
            server.stop()
        return
    handler = type("Handler", (_SendfileHandler,), {"root": archives[0].parent})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield [f"http://{host}:{port}/{a.name}" for a in archives]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _busy() -> float:
    """CPU seconds all processes on the machine have used, system-wide."""
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def run_one(mode: int, processes: int, urls: list[str], cache_root: Path) -> dict[str, float]:
    """One run in a fresh interpreter; its wall time includes starting worker processes."""
    cache_dir = cache_root / f"cache-{mode}-{processes}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TFHUB_DOWNLOAD_PROGRESS", None)
    server_cpu = _cpu()
    busy = _busy()
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(cache_dir), str(mode), str(processes), *urls],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    server_cpu = _cpu() - server_cpu
    busy = _busy() - busy
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    result: dict[str, float] = json.loads(done.stdout)
    result["server_cpu"] = server_cpu
    # CPU the rest of the machine used meanwhile (2 shared cores: other jobs skew figures).
    result["other_cpu"] = max(0.0, busy - server_cpu - result["cpu_total"])
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["test", "sendfile"], default="test")
    parser.add_argument("--weights", choices=["random", "float32"], default="random")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "asynchub-bench")
    parser.add_argument("--json", action="store_true", help="print every run as JSON")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="prefetch rows for each N worker processes (1: in-process; e.g. --processes 1 2)",
    )
    args = parser.parse_args()

    archives = build_archives(args.work, args.weights)
    total = sum(a.stat().st_size for a in archives)
    print(
        f"{len(archives)} archives, {total / 1e6:.0f} MB compressed, "
        f"server={args.server}, weights={args.weights}, cores={os.cpu_count()}"
    )
    modes = [(0, 1)] + [(j, p) for p in args.processes for j in (1, 2, 4, 8) if j >= p or p == 1]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {m: [] for m in modes}
    with serve(args.server, archives) as urls:
        for _ in range(args.repeat):
            for mode, processes in modes:
                runs[mode, processes].append(run_one(mode, processes, urls, args.work))
    base = min(r["wall"] for r in runs[0, 1])
    print(
        f"{'run':<20}{'wall s':>8}{'vs seq':>8}{'MB/s':>8}{'cpu s':>8}{'srv cpu':>9}"
        f"{'others':>8}{'peak RSS':>10}{'(base)':>8}{'child RSS':>12}"
    )
    for mode in modes:
        best = min(runs[mode], key=lambda r: r["wall"])
        name = "sequential" if mode == (0, 1) else f"prefetch j={mode[0]} p={mode[1]}"
        print(
            f"{name:<20}{best['wall']:>8.2f}{best['wall'] / base:>8.2f}"
            f"{total / 1e6 / best['wall']:>8.0f}{best['cpu']:>8.2f}{best['server_cpu']:>9.2f}"
            f"{best['other_cpu']:>8.2f}"
            f"{best['peak_rss'] / 1e6:>8.0f}MB{best['base_rss'] / 1e6:>6.0f}MB"
            f"{best.get('worker_peak_rss', 0) / 1e6:>10.0f}MB"
        )
    if args.json:
        print(json.dumps({f"j={m[0]} p={m[1]}": r for m, r in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
