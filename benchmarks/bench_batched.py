"""Async apply: the plain async path, per-row ``await m.acall(x)``, and ``await b(x)``
with ``b = m.batched()``.

N clients, each a task on one asyncio event loop, send single-row requests one
after the other (closed loop), for 1 to 256 clients. Each client sends a numpy row
of its own, as a web app's decoded requests are; the tensor rows beside them are
the same values made into ``tf.Tensor`` once, per client. Each case runs for a
warm-up, then a timed window: rows/s counts the requests that completed in the
window, and latency is each such request's time from call to result. Cases take
turns round by round, and a ratio is a case's rows/s over the baseline's in the
same round. The baseline is what an app would write without asynchub, and does not
move when asynchub gets faster: ``await anyio.to_thread.run_sync(lambda:
sig(x=tf.constant(row)))`` on anyio's default thread pool.

A second table is the event loop's heartbeat (a task sleeping 1 ms at a time) while
8 clients apply the model: calling ``m(x)`` straight from the loop, through
``acall``, and through ``batched``.

Models are exported once (random weights). There is no ``gc.freeze()``: a user of
the library does not call it, and asynchub does not either.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import _harness as h
from ._work import Section, Work, log

BASELINE = "plain async"
#: The headline cases, on numpy rows.
ACALL, BATCHED, TENSORS = (
    "acall",
    "batched (max_delay=2 ms)",
    "batched (max_delay=2 ms), tensor rows",
)
#: Clients per model (full run, quick run). 128 is the MLP's goal: acall >= 1.5x and
#: batched >= 20x the plain async path, p99 <= 5 ms; tensor rows no faster than numpy.
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
    apply: Apply, rows: list[Any], clients: int, warmup: float, window: float
) -> tuple[int, list[float]]:
    """Requests completed in the window, and their latencies (seconds); client i sends
    ``rows[i % len(rows)]``."""
    import anyio

    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + window

    async def client(x: Any) -> None:
        while True:
            sent = time.perf_counter()
            await apply(x)
            done = time.perf_counter()
            if start <= done <= end:
                latencies.append(done - sent)

    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, rows[i % len(rows)])
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


def _plain(m: Any, tf: Any) -> Apply:
    """The plain async path an app would write without asynchub (anyio's default pool)."""
    import anyio.to_thread

    sig = m.obj.signatures["serving_default"]
    (name,) = m.signatures["serving_default"].input_names
    (output,) = m.signatures["serving_default"].output_names
    constant = tf.constant

    async def plain(row: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: sig(**{name: constant(row)})[output])

    return plain


def _cases(m: Any, tf: Any, model: str) -> tuple[dict[str, Apply], dict[str, _Counted]]:
    """Each case, and a call counter for each batcher. Cases named ``..., tensor rows``
    are given tensors; the others numpy rows."""
    from asynchub._batching import Batched

    batched = m.batched()
    eager = m.batched(max_delay=0.0)
    cases: dict[str, Apply] = {BASELINE: _plain(m, tf), ACALL: m.acall, BATCHED: batched}
    if model == "MLP":
        cases["batched (max_delay=0)"] = eager
        cases[TENSORS] = batched
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
    counted = {label: _Counted(b) for label, b in cases.items() if isinstance(b, Batched)}
    return cases, counted


async def _measure_model(
    m: Any, tf: Any, model: str, rows: list[Any], quick: bool
) -> dict[str, Any]:
    import numpy as np

    cases, counted = _cases(m, tf, model)
    tensors = [tf.constant(row) for row in rows]
    expected = m(rows[0]).numpy()
    for label, apply in cases.items():
        if "identity" in label:
            continue
        got = (await apply(tensors[0] if label == TENSORS else rows[0])).numpy()
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
                given = tensors if name == TENSORS else rows
                done, lat = await _drive(cases[name], given, clients, warmup, window)
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
            "after the other, a float32 numpy row of its own (tensor rows: the same made "
            "into a `tf.Tensor` once). `plain async` (the baseline) = `await "
            "anyio.to_thread.run_sync(lambda: sig(x=tf.constant(row)))` on anyio's default "
            "pool, as an app would write it without asynchub; `acall` = per-row `await "
            "m.acall(x)`; `batched` = `await b(x)` with `b = m.batched()` "
            "(max_batch_size=64); 'identity model' is a batcher around a model that costs "
            "nothing: the ceiling. vs plain = rows/s ÷ the baseline's rows/s in the same "
            "round, median [min, max]; p50/p99 = latency per request over all rounds; "
            "rows/call = mean rows per model call. "
            f"{THREADS} worker threads per module; no `gc.freeze()`."
        ),
        columns=["model", "clients", "case", "rows/s", "vs plain", "p50 ms", "p99 ms", "rows/call"],
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
        data = tf.random.stateless_uniform([64, *spec.shape[1:]], seed=[3, 4]).numpy()
        rows = [data[i : i + 1].copy() for i in range(len(data))]  # one per client (mod 64)
        m(rows[0])  # plans and traces, outside the timing
        results = anyio.run(_measure_model, m, tf, model, rows, work.quick)
        hb = anyio.run(_measure_heartbeat, m, rows[0], work.quick)
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
        a, b, t = goal[ACALL], goal[BATCHED], goal[TENSORS]
        numpy_vs_tensor = b["rows_per_s"]["median"] / t["rows_per_s"]["median"]
        table.note += (
            " Goals (MLP, 128 clients: acall >= 1.5x plain; batched >= 20x plain, "
            "p99 <= 5 ms; batched numpy rows >= 0.95x tensor rows): "
            f"acall {a['ratio']['median']:.1f}x; batched {b['ratio']['median']:.1f}x, "
            f"p99 {b['p99_ms']:.1f} ms; numpy ÷ tensor rows {numpy_vs_tensor:.2f}."
        )
    return [table, beats]
