"""The batcher's answers are the module's answers, and no call is left hanging.

- an output without a batch dimension is never split between requests;
- a joined call that succeeded is never run again (a model may keep state);
- a call the callable object refuses leaves it usable from every thread;
- a big numpy request is converted in the worker thread, not on the event loop;
- the batcher's observer is told of each call it makes.

Async tests run on asyncio and on trio. The SavedModels are built once per test module.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from asynchub import ModuleError, SignatureError
from asynchub._batching import Batched, loop_threads
from asynchub._module import Module, load_module

from ._heartbeat import largest_gap

pytestmark = pytest.mark.tf

TABLE = [10, 20, 30, 40]


# --- SavedModels made for these tests -------------------------------------------------


def table_module(path: Path) -> Path:
    """A ``tf.Module`` whose outputs include a constant table, ``classes``: int32[4].

    - ``__call__(x: float32[?, 2])`` = ``{"y": 2 * x, "classes": table}``;
    - ``lookup(x: float32[?, 2])`` = ``{"scores": 2 * x, "classes": table}``;
    - ``ranked(x: float32[?, 2])`` = ``{"default": sum(x, axis=1), "classes": table}``;
    - ``liar(x: float32[?, 2])`` = ``{"y": 2 * x, "classes": table}``, with ``classes``
      declared ``[?]``: a spec that claims a batch dimension the value lacks;
    - ``counted(x: float32[?, 2])`` = ``{"y": 2 * x}``.

    ``liar`` and ``counted`` add 1 to the variable ``calls`` each time they run.
    """
    import tensorflow as tf

    class Table(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = tf.constant(TABLE, tf.int32)
            self.calls = tf.Variable(0, trainable=False, name="calls")

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return {"y": x * 2.0, "classes": self.table}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def lookup(self, x: Any) -> Any:
            return {"scores": x * 2.0, "classes": self.table}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def ranked(self, x: Any) -> Any:
            return {"default": tf.reduce_sum(x, axis=1), "classes": self.table}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def liar(self, x: Any) -> Any:
            self.calls.assign_add(1)
            # A slice whose end is computed: its static shape is [?], its value [4].
            return {"y": x * 2.0, "classes": self.table[: tf.shape(x)[0] * 0 + 4]}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def counted(self, x: Any) -> Any:
            self.calls.assign_add(1)
            return {"y": x * 2.0}

    module = Table()
    names = ("lookup", "ranked", "liar", "counted")
    tf.saved_model.save(module, str(path), signatures={n: getattr(module, n) for n in names})
    return path


def wide_module(path: Path) -> Path:
    """``__call__(x: float32[?, 1024])`` and signature ``wide``: ``{"y": sum(x, axis=1)}``."""
    import tensorflow as tf

    class Wide(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1024], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return {"y": tf.reduce_sum(x, axis=1)}

    module = Wide()
    tf.saved_model.save(module, str(path), signatures={"wide": module.__call__})
    return path


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def saved(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching-correctness")
    return {"table": table_module(root / "table"), "wide": wide_module(root / "wide")}


@pytest.fixture(scope="module")
def table(saved: dict[str, Path]) -> Module:
    return load_module(saved["table"], handle="test/table")


@pytest.fixture(scope="module")
def wide(saved: dict[str, Path]) -> Module:
    return load_module(saved["wide"], handle="test/wide")


def calls(m: Module) -> int:
    return int(m.obj.calls.numpy())


async def gather(fn: Callable[[Any], Awaitable[Any]], requests: list[Any]) -> list[Any]:
    """``fn`` of each request, concurrently; each result, or the exception it raised."""
    results: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        try:
            results[i] = await fn(requests[i])
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return results


# --- 1. an output without a batch dimension -------------------------------------------


@pytest.mark.anyio
async def test_an_output_without_a_batch_dimension_is_never_split(table: Module) -> None:
    rows = [np.full([1, 2], i, np.float32) for i in range(4)]
    # Four one-row requests make a batch of four rows, as long as the table: a split
    # decided by the result's shape would hand each request one of its values.
    refusals = {
        "lookup": lambda: table.batched("lookup", as_dict=True, max_batch_size=4, max_delay=5),
        "ranked": lambda: table.batched("ranked", as_dict=True, max_batch_size=4, max_delay=5),
        "callable": lambda: table.batched(max_batch_size=4, max_delay=5),
    }
    for name, make in refusals.items():
        try:
            b = make()
        except SignatureError as exc:
            message = str(exc)
        else:
            got = await gather(b, rows)  # what it answers instead of refusing
            pytest.fail(f"{name}: batched() made a batcher, which answered {got}")
        assert "output 'classes' has shape [4]" in message, message
        assert "no leading batch dimension" in message and "m.acall(...)" in message
    # Only the outputs a batcher returns count: as_dict=False returns 'default' alone.
    b = table.batched("ranked", max_batch_size=4, max_delay=5)
    got = await gather(b, rows)
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y.numpy(), [2.0 * i])


@pytest.fixture
def unfreeze() -> Iterator[None]:
    """The server freezes the garbage collector after a load; the test process thaws it."""
    yield
    gc.unfreeze()


@pytest.mark.anyio
@pytest.mark.usefixtures("unfreeze")
async def test_serve_infer_answers_a_table_output_whole(tmp_path: Path, tf: Any) -> None:
    # serve --infer takes the batcher's refusal as "run requests one by one": every
    # client gets the whole table, however many arrive together.
    from asynchub.server import InferOptions, create_app

    table_module(tmp_path / "table" / "1")
    app = create_app(tmp_path, infer=InferOptions(max_delay=0.05))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as web,
    ):

        async def one(i: int) -> httpx.Response:
            x = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [i, i]}
            body = {"inputs": [x], "parameters": {"signature": "lookup"}}
            return await web.post("/v2/models/table/infer", json=body)

        await one(0)  # loads it
        answers = await gather(one, list(range(4)))
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["classes"] == TABLE
        assert outputs["scores"] == [2.0 * i, 2.0 * i]


# --- 2. a joined call that succeeded is not run again ---------------------------------


@pytest.mark.anyio
async def test_a_joined_call_that_succeeded_is_never_run_again(table: Module) -> None:
    rows = [np.full([1, 2], i, np.float32) for i in range(3)]
    # A healthy stateful model: one joined call, applied once.
    counted = table.batched("counted", as_dict=True, max_batch_size=3, max_delay=5)
    before = calls(table)
    got = await gather(counted, rows)
    assert calls(table) == before + 1
    for i, result in enumerate(got):
        np.testing.assert_array_equal(result["y"].numpy(), [[2.0 * i, 2.0 * i]])
    # A model whose output breaks its spec ([?], yet 4 values for 3 rows): its joined
    # call succeeded, so it is not run again request by request (which would apply a
    # stateful model twice); each request fails instead, saying why.
    liar = table.batched("liar", as_dict=True, max_batch_size=3, max_delay=5)
    before = calls(table)
    got = await gather(liar, rows)
    assert calls(table) == before + 1
    for error in got:
        assert isinstance(error, ModuleError), error
        message = str(error)
        assert "output 'classes' of shape [4]" in message, message
        assert "3 requests (3 rows)" in message and "m.acall(...)" in message
    # Alone, it answers what m(x) does.
    np.testing.assert_array_equal((await liar(rows[1]))["classes"].numpy(), TABLE)


# --- 3. a refused call leaves the callable object usable ------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("mistake", ["row shape", "keyword"])
def test_a_refused_call_leaves_the_callable_object_usable(
    saved: dict[str, Path], backend: str, mistake: str
) -> None:
    # TensorFlow 2.21's tf.function keeps its lock when it cannot bind its inputs; a
    # call from any other thread then waited for it forever. A fresh module per case,
    # since a leaked lock would outlive the test. The loop runs in a thread of its own,
    # so that a hang fails the test instead of stopping the suite.
    m = load_module(saved["wide"], handle="test/wide-fresh")
    good = [np.full([1 + i % 3, 1024], i, np.float32) for i in range(6)]
    failures: list[BaseException] = []

    async def main() -> None:
        if mistake == "row shape":
            with pytest.raises(SignatureError, match="does not accept"):
                await m.acall(np.ones([2, 5], np.float32))
        else:
            with pytest.raises(SignatureError, match="does not accept"):
                await m.acall(good[0], unexpected=1)
        with anyio.fail_after(10):
            got = await gather(m.acall, good)
            joined = await gather(m.batched(max_delay=0.01), good)
        for x, y, z in zip(good, got, joined, strict=True):
            np.testing.assert_allclose(y["y"].numpy(), x.sum(axis=1), rtol=1e-6)
            np.testing.assert_allclose(z["y"].numpy(), x.sum(axis=1), rtol=1e-6)

    def run() -> None:
        try:
            anyio.run(main, backend=backend)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "good calls still waiting 30 s after a refused one"
    assert failures == []


# --- 4. a big request is converted off the loop ---------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("signature", [None, "wide"])
async def test_a_big_numpy_request_is_converted_off_the_loop(
    wide: Module, tf: Any, signature: str | None
) -> None:
    # 128 MiB of float64 for a float32 input: the binder cast it on the event loop,
    # which then stalled as long as the cast done there on purpose. Now the loop only
    # looks at its dtype and shape; the cast happens in the worker thread. Best of three
    # rounds, each against a cast on the loop measured just before it: shared cores.
    x = np.ones([16384, 1024], np.float64)
    b = wide.batched(signature, as_dict=True)
    await b(np.ones([2, 1024], np.float64))  # a form's first call traces: not measured
    tf.convert_to_tensor(x, tf.float32)  # the first touch of fresh memory: not measured
    got: list[Any] = []

    async def on_the_loop() -> None:
        tf.convert_to_tensor(x, tf.float32)

    async def batched() -> None:
        got.append(await b(x))

    rounds = []
    for _ in range(3):
        blocked = await largest_gap(on_the_loop)
        gap = await largest_gap(batched)
        rounds.append((gap, blocked))
        if gap < 0.5 * blocked:
            break
    else:
        shown = ", ".join(f"{g * 1000:.0f} ms against {s * 1000:.0f} ms" for g, s in rounds)
        pytest.fail(f"the loop stalled about as long as the cast takes on it: {shown}")
    np.testing.assert_allclose(got[-1]["y"].numpy(), np.full([16384], 1024.0))


@pytest.mark.anyio
async def test_a_numpy_request_stays_numpy_until_the_worker_thread(
    wide: Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Requests of another dtype join only each other, so that a batch is cast once.
    b = wide.batched("wide", as_dict=True, max_batch_size=8, max_delay=0.05)
    seen: list[tuple[type, str, int]] = []
    original = b._call

    def spy(payload: Any) -> Any:
        seen.append((type(payload), str(payload.dtype), int(payload.shape[0])))
        return original(payload)

    monkeypatch.setattr(b, "_call", spy)
    requests = [np.full([1, 1024], i, np.float32 if i % 2 else np.float64) for i in range(8)]
    got = await gather(b, requests)
    for x, y in zip(requests, got, strict=True):
        np.testing.assert_allclose(y["y"].numpy(), x.sum(axis=1), rtol=1e-6)
    assert sorted(seen) == [(np.ndarray, "float32", 4), (np.ndarray, "float64", 4)]
    # A bad row shape still fails alone, on the loop, with m(x)'s error.
    bad = np.ones([1, 5], np.float64)
    with pytest.raises(SignatureError) as expected:
        wide(bad, signature="wide")
    with pytest.raises(SignatureError) as refused:
        await b(bad)
    assert str(refused.value) == str(expected.value)
    with pytest.raises(SignatureError, match=r"does not accept a float32\[1, 5\]"):
        await wide.batched()(bad)


# --- the observer ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_observer_is_told_of_each_call(table: Module) -> None:
    b: Batched = table.batched("counted", as_dict=True, max_batch_size=4, max_delay=5)
    seen: list[tuple[int, int, float, float, int]] = []

    def observe(requests: int, rows: int, queued: float, computed: float) -> None:
        seen.append((requests, rows, queued, computed, threading.get_ident()))

    b.observer = observe
    loop_thread = threading.get_ident()
    try:
        # Three requests of 1, 1 and 2 rows fill a batch; their worker thread is held
        # for a while first, which shows in how long the oldest waited.
        limiter = loop_threads(table)
        tokens = [object() for _ in range(int(limiter.total_tokens))]
        for token in tokens:
            await limiter.acquire_on_behalf_of(token)
        rows = [np.ones([n, 2], np.float32) for n in (1, 1, 2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(gather, b, rows)
            await anyio.sleep(0.2)
            for token in tokens:
                limiter.release_on_behalf_of(token)
        # A request of max_batch_size rows or more runs alone: one call of one request.
        started = time.perf_counter()
        await b(np.ones([6, 2], np.float32))
        took = time.perf_counter() - started
        with pytest.raises(SignatureError):
            await b(np.ones([6, 3], np.float32))  # refused before it queues: not a call
    finally:
        b.observer = None
    await b(np.ones([1, 2], np.float32))  # not observed
    assert [(r, n) for r, n, *_ in seen] == [(3, 4), (1, 6)]
    (_, _, queued, computed, thread), (_, _, queued_alone, computed_alone, _) = seen
    assert 0.2 <= queued < 5 and 0 < computed < 5
    assert queued_alone >= 0 and 0 < computed_alone <= took
    assert thread == loop_thread  # called on the event loop


@pytest.mark.anyio
async def test_a_failing_observer_fails_no_request(
    table: Module, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    # A batcher of its own per back-end: a batcher says once that its observer failed.
    delay = 5.0 if anyio_backend == "asyncio" else 6.0
    b = table.batched("counted", as_dict=True, max_batch_size=2, max_delay=delay)

    def broken(requests: int, rows: int, queued: float, computed: float) -> None:
        raise RuntimeError("observer bug")

    b.observer = broken
    try:
        rows = [np.ones([1, 2], np.float32)] * 4
        got = await gather(b, rows)
        got.append(await b(np.ones([3, 2], np.float32)))
    finally:
        b.observer = None
    assert all(isinstance(result, dict) for result in got), got
    logged = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "observer bug" in str(logged[0].exc_info[1])
