"""Async apply: per-row ``await m.acall(x)`` against ``await b(x)`` with ``b = m.batched()``.

N clients, each a task on one asyncio event loop, send single-row requests one
after the other (closed loop), for 1 to 256 clients. Each case runs for a warm-up,
then a timed window: rows/s counts the requests that completed in the window, and
latency is each such request's time from call to result. Cases take turns round by
round, and a ratio is a case's rows/s over per-row ``acall``'s in the same round.

A second table is the event loop's heartbeat (a task sleeping 1 ms at a time) while
8 clients apply the model: calling ``m(x)`` straight from the loop, through
``acall``, and through ``batched``.

Models are exported once (random weights), and ``gc.freeze()`` follows loading,
as docs/applying.md advises a server to do.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import _harness as h
from ._work import Section, Work, log

BASELINE = "acall"
#: Clients per model (full run, quick run). 128 is the MLP's goal: >= 20x acall, p99 <= 5 ms.
_CLIENTS = {"MLP": ((1, 8, 64, 128, 256), (1, 8, 64)), "MobileNetV2": ((1, 8, 64, 256), (1, 8))}
_ROUNDS = {"MLP": (3, 1), "MobileNetV2": (1, 1)}
#: Rows/s a model roughly serves at best on 2 cores; sizes warm-up and window so that
#: every client gets several turns in the window, however many clients queue.
_ROUGH_RATE = {"MLP": 20_000.0, "MobileNetV2": 50.0}

Apply = Callable[[Any], Awaitable[Any]]


def _timing(model: str, clients: int, quick: bool) -> tuple[float, float]:
    """Seconds of warm-up and of timed window for one case."""
    cycle = clients / _ROUGH_RATE[model]  # how long one request of each client takes
    if quick:
        return 0.1 + cycle, 0.3 + cycle
    return 0.3 + 1.5 * cycle, max(1.0 if model == "MLP" else 4.0, 3 * cycle)


async def _drive(
    apply: Apply, x: Any, clients: int, warmup: float, window: float
) -> tuple[int, list[float]]:
    """Requests completed in the window, and their latencies (seconds)."""
    import anyio

    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + window

    async def client() -> None:
        while True:
            sent = time.perf_counter()
            await apply(x)
            done = time.perf_counter()
            if start <= done <= end:
                latencies.append(done - sent)

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(client)
        await anyio.sleep(warmup + window)
        # Cancelling every client at once is also a test: nothing may hang or leak.
        tg.cancel_scope.cancel()
    return len(latencies), latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _Counted:
    """Counts the calls a batcher makes and their rows (to show the batch sizes reached)."""

    def __init__(self, b: Any) -> None:
        self.calls = 0
        self.rows = 0
        inner = b._call

        def call(payload: Any) -> Any:
            self.calls += 1
            self.rows += int(payload.shape[0])
            return inner(payload)

        b._call = call


def _cases(m: Any, tf: Any, model: str) -> tuple[dict[str, Apply], dict[str, _Counted]]:
    from asynchub._batching import Batched

    batched = m.batched()
    eager = m.batched(max_delay=0.0)
    cases: dict[str, Apply] = {
        BASELINE: m.acall,
        "batched (max_delay=2 ms)": batched,
        "batched (max_delay=0)": eager,
    }
    if model == "MLP":
        # The same batcher with a model that costs nothing: what the batching itself
        # costs per request on the loop, the ceiling any model's rows/s stays under.
        free = Batched(
            owner=m,
            tf=tf,
            bind=batched._bind,
            call=lambda payload: payload,
            what="identity",
            handle=m.handle,
            max_batch_size=64,
            max_delay=0.0,
            max_queue=None,
        )
        cases["batched (max_delay=0), identity model"] = free
    counted = {label: _Counted(b) for label, b in cases.items() if label != BASELINE}
    return cases, counted


async def _measure_model(m: Any, tf: Any, model: str, x: Any, quick: bool) -> dict[str, Any]:
    import numpy as np

    cases, counted = _cases(m, tf, model)
    expected = m(x).numpy()
    for label, apply in cases.items():
        if "identity" in label:
            continue
        got = (await apply(x)).numpy()
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{label} disagrees with m(x) for {model}")
    results: dict[str, Any] = {}
    rounds = _ROUNDS[model][1 if quick else 0]
    for clients in _CLIENTS[model][1 if quick else 0]:
        warmup, window = _timing(model, clients, quick)
        log(f"batched: {model}, {clients} clients, {rounds} round(s) of {window:.1f}s per case")
        names = list(cases)
        rates: dict[str, list[float]] = {name: [] for name in names}
        latencies: dict[str, list[float]] = {name: [] for name in names}
        calls = dict.fromkeys(names, (0, 0))
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                counter = counted.get(name)
                before = (counter.calls, counter.rows) if counter else (0, 0)
                done, lat = await _drive(cases[name], x, clients, warmup, window)
                if counter:
                    calls[name] = (
                        calls[name][0] + counter.calls - before[0],
                        calls[name][1] + counter.rows - before[1],
                    )
                rates[name].append(done / window)
                latencies[name] += lat
        ratios = h.ratio_to({n: [1 / max(v, 1e-9) for v in rates[n]] for n in names}, BASELINE)
        results[str(clients)] = {
            name: {
                "rows_per_s": h.Spread.of(rates[name]).as_json(),
                "ratio": ratios[name].as_json(),
                "p50_ms": _percentile(latencies[name], 0.5) * 1e3,
                "p99_ms": _percentile(latencies[name], 0.99) * 1e3,
                "rows_per_call": (calls[name][1] / calls[name][0]) if calls[name][0] else 1.0,
                "rounds": rounds,
            }
            for name in names
        }
    return results


async def _heartbeat(
    apply: Callable[[Any], Any], x: Any, seconds: float, blocking: bool
) -> list[float]:
    """Gaps between 1 ms heartbeats while 8 clients apply the model for ``seconds``."""
    import anyio

    gaps: list[float] = []

    async def client() -> None:
        while True:
            if blocking:
                apply(x)
                await anyio.sleep(0)
            else:
                await apply(x)

    async def heartbeat() -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(client)
        await anyio.sleep(min(0.5, seconds / 2))  # warm-up
        tg.start_soon(heartbeat)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()
    return gaps


async def _measure_heartbeat(m: Any, x: Any, quick: bool) -> dict[str, Any]:
    seconds = 0.2 if quick else 3.0
    cases: list[tuple[str, Callable[[Any], Any], bool]] = [
        ("m(x) on the loop", m, True),
        ("await m.acall(x)", m.acall, False),
        ("await b(x), b = m.batched()", m.batched(), False),
    ]
    out: dict[str, Any] = {}
    for label, apply, blocking in cases:
        gaps = await _heartbeat(apply, x, seconds, blocking)
        out[label] = {
            "p50_ms": statistics.median(gaps) * 1e3,
            "p99_ms": _percentile(gaps, 0.99) * 1e3,
            "max_ms": max(gaps) * 1e3,
            "beats": len(gaps),
        }
    return out


def run(work: Work) -> list[Section]:
    import anyio
    import tensorflow as tf

    import asynchub
    from asynchub._batching import THREADS

    table = Section(
        title="Batched: async apply, rows/s and latency by concurrent clients",
        note=(
            "Each client is a task on one asyncio loop sending single-row requests one "
            "after the other. `acall` = per-row `await m.acall(x)` (the baseline); "
            "`batched` = `await b(x)` with `b = m.batched()` (max_batch_size=64); "
            "'identity model' is a batcher around a model that costs nothing: the ceiling. "
            "vs acall = rows/s ÷ acall's rows/s in the same round, median [min, max]; "
            "p50/p99 = latency per request over all rounds; rows/call = mean rows per "
            f"model call. {THREADS} worker threads per module; `gc.freeze()` after loading."
        ),
        columns=["model", "clients", "case", "rows/s", "vs acall", "p50 ms", "p99 ms", "rows/call"],
    )
    beats = Section(
        title="Batched: event loop heartbeat while 8 clients apply the model",
        note=(
            "Gaps between the wake-ups of a task that sleeps 1 ms at a time, in ms, "
            "while 8 clients apply the model with single rows. A call made straight "
            "from the loop stalls it for the whole call; acall and batched keep it running."
        ),
        columns=["model", "how", "p50 gap", "p99 gap", "max gap", "beats"],
    )
    for model in ("MLP", "MobileNetV2"):
        path = str(work.keras_module(model))
        m = asynchub.load(path)
        (spec,) = m.signatures["serving_default"].inputs
        assert spec.shape is not None
        x = tf.random.stateless_uniform([1, *spec.shape[1:]], seed=[3, 4])
        m(x)  # plans and traces, outside the timing
        gc.collect()
        gc.freeze()
        try:
            results = anyio.run(_measure_model, m, tf, model, x, work.quick)
            hb = anyio.run(_measure_heartbeat, m, x, work.quick)
        finally:
            gc.unfreeze()
        table.data[model] = results
        beats.data[model] = hb
        for clients, by_case in results.items():
            for label, r in by_case.items():
                table.rows.append(
                    [
                        model,
                        clients,
                        label,
                        f"{r['rows_per_s']['median']:,.0f}",
                        h.Spread(**r["ratio"]).fmt(1),
                        f"{r['p50_ms']:,.2f}",
                        f"{r['p99_ms']:,.2f}",
                        f"{r['rows_per_call']:.1f}",
                    ]
                )
        for label, g in hb.items():
            beats.rows.append(
                [
                    model,
                    label,
                    f"{g['p50_ms']:.1f}",
                    f"{g['p99_ms']:.1f}",
                    f"{g['max_ms']:.1f}",
                    str(g["beats"]),
                ]
            )
    goal = table.data["MLP"].get("128")
    if goal is not None:
        b = goal["batched (max_delay=2 ms)"]
        table.note += (
            f" Goal (MLP, 128 clients: >= 20x acall, p99 <= 5 ms): "
            f"{b['ratio']['median']:.1f}x, p99 {b['p99_ms']:.1f} ms."
        )
    return [table, beats]
