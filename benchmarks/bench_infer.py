"""``asynchub serve --infer`` under load: micro-batching against ``--no-batching``.

Servers run side by side, started as users start them (``python -m asynchub serve
ROOT --infer --preload --no-access-log``, with and without ``--no-batching``, on
uvloop and httptools (the default when installed) and on uvicorn's pure-Python loop
and parser), each hosting the small MLP (64 -> 128 -> 10). 64 concurrent
``tritonclient.http.aio`` clients (one connection each, all on one uvloop event loop
in a process of their own, which holds no TensorFlow) send single-row requests one
after the other (closed loop), as tritonclient sends them by default: binary tensors
both ways. Each case gets a warm-up, then a timed
window: rows/s counts the requests that completed in the window, latency is each such
request's time from call to answer. Cases take turns round by round, and the ratio is
batching's rows/s over ``--no-batching``'s in the same round.

The CPU seconds each process spent per request show who limits the rate: the
server (HTTP, decoding, binding, TensorFlow) or the clients' process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _harness as h
from ._work import Section, Work, log

CLIENTS = 64
#: Seconds of warm-up and of timed window per case, and rounds (full run, quick run).
_WARMUP = (1.0, 0.3)
_WINDOW = (3.0, 0.5)
_ROUNDS = (3, 1)
_START_TIMEOUT = 180
#: The goal for batching, from the issue: rows/s against --no-batching, and p99 latency.
_GOAL_RATIO, _GOAL_P99_MS = 5.0, 20.0
BASELINE = "--no-batching"
#: uvicorn's pure-Python event loop and HTTP parser, against uvloop and httptools
#: (what ``--loop auto --http auto`` takes when they are installed, as the server extra does).
_PURE = ["--loop", "asyncio", "--http", "h11"]
CASES = {
    "batching (default knobs)": [],
    BASELINE: ["--no-batching"],
    "batching, asyncio loop + h11": _PURE,
    "--no-batching, asyncio loop + h11": ["--no-batching", *_PURE],
}


class _Server:
    """One ``asynchub serve --infer`` process; its address and the CPU it has used."""

    def __init__(self, root: Path, cache: Path, flags: list[str]) -> None:
        env = {
            **os.environ,
            "TFHUB_CACHE_DIR": str(cache),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": os.pathsep.join(
                filter(
                    None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
                )
            ),
        }
        command = [sys.executable, "-m", "asynchub", "serve", str(root), "--infer", "--preload"]
        command += ["--host", "127.0.0.1", "--port", "0", "--no-access-log", *flags]
        self.proc = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.log: list[str] = []
        self.address: str | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"Uvicorn running on http://(\S+)", line)
            if found:
                self.address = found.group(1)
                self._started.set()
        self._started.set()

    def wait(self) -> str:
        if not self._started.wait(_START_TIMEOUT) or self.address is None:
            raise RuntimeError(f"asynchub serve --infer did not start:\n{''.join(self.log)}")
        return self.address

    def cpu(self) -> float:
        """CPU seconds (user + system) the server has used so far, all its threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def _servers(root: Path, work: Work) -> Iterator[dict[str, _Server]]:
    servers: dict[str, _Server] = {}
    try:
        for label, flags in CASES.items():  # started together: TensorFlow imports overlap
            servers[label] = _Server(root, work.fresh_dir(f"infer-cache-{len(servers)}"), flags)
        for server in servers.values():
            server.wait()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


async def _drive(address: str, name: str, x: Any, warmup: float, window: float) -> dict[str, Any]:
    """Run the clients against one server; requests done in the window and their latencies."""
    import tritonclient.http as http
    import tritonclient.http.aio as aio

    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + window
    clients = [aio.InferenceServerClient(address, conn_timeout=60) for _ in range(CLIENTS)]

    async def client(c: Any) -> None:
        tensor = http.InferInput(name, list(x.shape), "FP32").set_data_from_numpy(x)
        while True:
            sent = time.perf_counter()
            result = await c.infer("mlp", [tensor])
            done = time.perf_counter()
            if result.as_numpy("default").shape != (1, 10):
                raise RuntimeError(f"unexpected answer {result.get_response()}")
            if done > end:
                return
            if done >= start:
                latencies.append(done - sent)

    try:
        await asyncio.gather(*(client(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    return {"latencies": latencies}


def _clients(address: str, name: str, warmup: float, window: float) -> dict[str, Any]:
    """:func:`_drive` in a process of its own, which holds no TensorFlow (so no GC pauses
    of a big heap in the clients) and whose CPU time is the clients' alone."""
    command = [sys.executable, "-m", "benchmarks.bench_infer", address, name]
    command += [str(warmup), str(window)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=warmup + window + 120,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"the clients failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _client_main(argv: list[str]) -> None:
    import numpy as np

    address, name, warmup, window = argv[0], argv[1], float(argv[2]), float(argv[3])
    x = np.random.default_rng(3).random((1, 64), dtype=np.float32)
    try:  # uvicorn's loop, if installed, for the clients too: less of the cores go to them
        from uvloop import run as run_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        run_loop = asyncio.run
    cpu = time.process_time()
    result = run_loop(_drive(address, name, x, warmup, window))
    result["client_cpu"] = time.process_time() - cpu
    print(json.dumps(result))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(work: Work) -> list[Section]:
    import numpy as np
    import tritonclient.http as http

    import asynchub

    quick = 1 if work.quick else 0
    warmup, window, rounds = _WARMUP[quick], _WINDOW[quick], _ROUNDS[quick]
    source = work.keras_module("MLP")
    root = work.fresh_dir("infer-root")
    shutil.copytree(source, root / "mlp" / "1")
    m = asynchub.load(str(source))
    (spec,) = m.signatures["default"].inputs
    x = np.random.default_rng(3).random((1, 64), dtype=np.float32)
    expected = m(x).numpy()

    table = Section(
        title="Infer: asynchub serve --infer, 64 tritonclient.http.aio clients, single rows",
        note=(
            f"{CLIENTS} clients (one connection each, on one uvloop event loop in a process "
            "of their own) send single-row requests one after the other to the small MLP "
            "(64→128→10), binary tensors both ways (tritonclient's default). batching = "
            "`m.batched` per model (max_batch_size 64, max_delay 2 ms); --no-batching = "
            "each request alone in a worker thread. Servers run on uvloop and httptools "
            "(uvicorn's `auto`, as installed by the server extra) unless the case says "
            "'asyncio loop + h11' (`--loop asyncio --http h11`). vs --no-batching = "
            "rows/s ÷ --no-batching's rows/s in the same round, median [min, max]; "
            "p50/p99 = latency per request over all rounds; server / client CPU = CPU "
            "time each process spent per request (µs): the machine's cores are shared by both."
        ),
        columns=[
            "case",
            "rows/s",
            "vs --no-batching",
            "p50 ms",
            "p99 ms",
            "server CPU µs/req",
            "client CPU µs/req",
        ],
    )
    with _servers(root, work) as servers:
        log(f"infer: servers up at {', '.join(s.wait() for s in servers.values())}")
        for label, server in servers.items():  # each answers like the module in memory
            with http.InferenceServerClient(server.wait()) as c:
                tensor = http.InferInput(spec.name, [1, 64], "FP32").set_data_from_numpy(x)
                answer = c.infer("mlp", [tensor]).as_numpy("default")
            if not np.allclose(answer, expected, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{label} disagrees with m(x)")
        names = list(servers)
        rates: dict[str, list[float]] = {n: [] for n in names}
        latencies: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
        for r in range(rounds):
            shift = r % len(names)
            for label in names[shift:] + names[:shift]:
                server = servers[label]
                log(f"infer: round {r + 1}/{rounds}, {label}, {window:.1f}s")
                before = server.cpu()
                got = _clients(server.wait(), spec.name, warmup, window)
                served = server.cpu() - before
                done = len(got["latencies"])
                rates[label].append(done / window)
                latencies[label] += got["latencies"]
                # Per request over the whole drive (warm-up included): CPU is counted for all.
                total = done * (warmup + window) / window
                cpu[label].append((served, got["client_cpu"], max(1, round(total))))
        ratios = h.ratio_to({n: [1 / max(v, 1e-9) for v in rates[n]] for n in names}, BASELINE)
    for label in names:
        served = sum(c[0] for c in cpu[label]) / sum(c[2] for c in cpu[label])
        client = sum(c[1] for c in cpu[label]) / sum(c[2] for c in cpu[label])
        table.data[label] = {
            "rows_per_s": h.Spread.of(rates[label]).as_json(),
            "ratio": ratios[label].as_json(),
            "p50_ms": _percentile(latencies[label], 0.5) * 1e3,
            "p99_ms": _percentile(latencies[label], 0.99) * 1e3,
            "server_cpu_us": served * 1e6,
            "client_cpu_us": client * 1e6,
            "rounds": rounds,
        }
        d = table.data[label]
        table.rows.append(
            [
                label,
                f"{d['rows_per_s']['median']:,.0f}",
                ratios[label].fmt(2),
                f"{d['p50_ms']:.1f}",
                f"{d['p99_ms']:.1f}",
                f"{d['server_cpu_us']:.0f}",
                f"{d['client_cpu_us']:.0f}",
            ]
        )
    batched = table.data[names[0]]
    table.note += (
        f" Goal (>= {_GOAL_RATIO:.0f}x --no-batching, p99 <= {_GOAL_P99_MS:.0f} ms): "
        f"{batched['ratio']['median']:.2f}x, p99 {batched['p99_ms']:.1f} ms."
    )
    fast = [
        h.Spread.of([a / b for a, b in zip(rates[x], rates[y], strict=True)]).fmt(2)
        for x, y in ((names[0], names[2]), (names[1], names[3]))
    ]
    table.note += (
        f" uvloop + httptools ÷ asyncio loop + h11, same round: batching {fast[0]}, "
        f"--no-batching {fast[1]}."
    )
    return [table]


if __name__ == "__main__":
    _client_main(sys.argv[1:])
