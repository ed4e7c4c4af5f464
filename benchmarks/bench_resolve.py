"""One big archive from a loopback server: asynchub's resolve beside ``curl | tar xz``.

    python -m benchmarks.bench_resolve [--model ResNet101] [--repeat 3]

Builds a Keras application with random weights (nothing is downloaded), saves
it as a SavedModel, packs it, serves the directory with ``python -m http.server``
on 127.0.0.1 (a static server that ignores the query, as many hosts do), then
times, in the same run and alternating, a fresh ``asynchub`` resolve in a
subprocess and ``curl -s URL | tar xz`` into an empty dir. Peak RSS is each
child's own maximum resident set (``/usr/bin/time -f %M``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RESOLVE = (
    "import sys, anyio, asynchub\n"
    "async def main():\n"
    "    async with asynchub.AsyncHub(cache_dir=sys.argv[1]) as hub:\n"
    "        await hub.resolve(sys.argv[2])\n"
    "anyio.run(main)\n"
)


def build_archive(model_name: str, out: Path) -> Path:
    """Save ``keras.applications.<model_name>(weights=None)`` and pack it to ``out``."""
    code = (
        "import sys, keras, asynchub\n"
        f"m = keras.applications.{model_name}(weights=None)\n"
        "d = asynchub.export(m, sys.argv[1])\n"
        "asynchub.pack(d, sys.argv[2])\n"
    )
    work = out.parent / "export"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", code, str(work), str(out)], check=True, env=env)
    shutil.rmtree(work, ignore_errors=True)
    return out


def timed(cmd: list[str], *, shell: bool = False) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of ``cmd``, measured by GNU time."""
    report = tempfile.NamedTemporaryFile(suffix=".time", delete=False)
    report.close()
    timer = ["/usr/bin/time", "-o", report.name, "-f", "%M"]
    full = [*timer, "bash", "-c", cmd[0]] if shell else [*timer, *cmd]
    started = time.perf_counter()
    subprocess.run(full, check=True)
    elapsed = time.perf_counter() - started
    rss = int(Path(report.name).read_text().split()[-1])
    os.unlink(report.name)
    return elapsed, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ResNet101")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="asynchub-bench-"))
    try:
        archive = build_archive(args.model, work / "root" / "model.tar.gz")
        size = archive.stat().st_size
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=work / "root",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}/model.tar.gz"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        rows: dict[str, list[tuple[float, int]]] = {"asynchub": [], "curl | tar xz": []}
        try:
            for i in range(args.repeat):
                cache = work / f"cache{i}"
                rows["asynchub"].append(timed([sys.executable, "-c", _RESOLVE, str(cache), url]))
                shutil.rmtree(cache)
                dest = work / f"curl{i}"
                dest.mkdir()
                rows["curl | tar xz"].append(
                    timed([f"curl -s '{url}' | tar xz -C '{dest}'"], shell=True)
                )
                shutil.rmtree(dest)
        finally:
            server.terminate()
            server.wait(10)
        base = statistics.median(t for t, _ in rows["curl | tar xz"])
        print(f"archive: {args.model}, {size / 1e6:.1f} MB, served by python -m http.server")
        print(f"{'method':<16}{'median s':>10}{'spread s':>10}{'MB/s':>8}{'vs curl':>9}{'peak RSS':>11}")
        results = {}
        for name, runs in rows.items():
            times = [t for t, _ in runs]
            med = statistics.median(times)
            rss = max(r for _, r in runs)
            results[name] = {"median_s": med, "runs_s": times, "peak_rss_kib": rss}
            print(
                f"{name:<16}{med:>10.2f}{max(times) - min(times):>10.2f}{size / 1e6 / med:>8.0f}"
                f"{base / med:>9.2f}{rss / 1024:>9.0f}MB"
            )
        if args.json:
            args.json.write_text(json.dumps({"bytes": size, "model": args.model, **results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
