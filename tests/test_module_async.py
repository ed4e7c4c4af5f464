"""Module from async code: ``acall``, ``batched``, and the variables of a plain tf.Module.

Every async test runs on asyncio and on trio. The SavedModels are built once per
test module; the Module objects are shared by both back-ends on purpose, since one
Module must serve several event loops.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from asynchub import SignatureError
from asynchub._batching import THREADS, Batched, QueueFullError, loop_threads
from asynchub._module import Module, load_module

from . import _savedmodels
from ._heartbeat import largest_gap

pytestmark = pytest.mark.tf


# --- SavedModels made for these tests -------------------------------------------------


def ops_module(path: Path) -> Path:
    """A plain ``tf.Module`` (no ``variables`` attribute survives saving) with:

    - ``__call__(x: float32[?, 4])`` = ``relu(x @ w + b)``;
    - ``checked(x: float32[?, 4])`` = ``{"y": x @ w}``, failing at run time on NaN;
    - ``totals(x: float32[?, ?])`` = ``{"total": 2 * sum(x, axis=1)}``: any row size;
    - ``fixed(x: float32[3])`` and ``scalar(x: float32[])``: no batch dimension;
    - ``slow(x: float32[?, 4])`` = ``{"y": x}`` after a loop of a few hundred ms;
    - ``spin(x: float32[?, 64], n: int32[])``: n rounds of ``tanh(x @ big)``.

    Variables: w (also tracked as ``inner.w``), b, big, and a non-trainable ``calls``.
    """
    import tensorflow as tf

    class Ops(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.reshape(tf.range(12.0) / 7.0 - 0.8, [4, 3]), name="w")
            self.b = tf.Variable([0.5, -1.0, 2.0], name="b")
            self.big = tf.Variable(
                tf.random.stateless_normal([64, 64], seed=[1, 2]) / 8.0, name="big"
            )
            self.calls = tf.Variable(0, trainable=False, name="calls")
            self.inner = tf.Module()
            self.inner.w = self.w  # the same variable, reachable twice

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return tf.nn.relu(tf.matmul(x, self.w) + self.b)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def checked(self, x: Any) -> Any:
            return {"y": tf.matmul(tf.debugging.check_numerics(x, "NaN or Inf in x"), self.w)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
        def totals(self, x: Any) -> Any:
            return {"total": tf.reduce_sum(x, axis=1) * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)])
        def fixed(self, x: Any) -> Any:
            return {"y": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def scalar(self, x: Any) -> Any:
            return {"y": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def slow(self, x: Any) -> Any:
            _, y = tf.while_loop(
                lambda i, y: i < 20_000, lambda i, y: (i + 1, tf.sin(y) * 0.0 + y), [0, x]
            )
            return {"y": y}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 64], tf.float32),
                tf.TensorSpec([], tf.int32, name="n"),
            ]
        )
        def spin(self, x: Any, n: Any) -> Any:
            def body(i: Any, y: Any) -> Any:
                return i + 1, tf.tanh(tf.matmul(y, self.big))

            _, y = tf.while_loop(lambda i, y: i < n, body, [0, x])
            return {"y": y}

    module = Ops()
    names = ("checked", "totals", "fixed", "scalar", "slow", "spin")
    tf.saved_model.save(module, str(path), signatures={n: getattr(module, n) for n in names})
    return path


def fixed_callable_module(path: Path) -> Path:
    """A callable whose input has a fixed first dimension: ``__call__(x: float32[1, 3])``."""
    import tensorflow as tf

    class Fixed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 3], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return x * 2.0

    tf.saved_model.save(Fixed(), str(path))
    return path


def two_dtype_module(path: Path) -> Path:
    """A callable traced for float32[?, 2] and int32[?, 2]; it returns ``x * 2``."""
    import tensorflow as tf

    class Twice(tf.Module):
        @tf.function
        def __call__(self, x: Any) -> Any:
            return x * tf.constant(2, dtype=x.dtype)

    module = Twice()
    for dtype in (tf.float32, tf.int32):
        module.__call__.get_concrete_function(tf.TensorSpec([None, 2], dtype))
    tf.saved_model.save(module, str(path))
    return path


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def models(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Module]:
    root = tmp_path_factory.mktemp("async-models")
    builders: dict[str, Callable[[Path], Path]] = {
        "ops": ops_module,
        "fruit": _savedmodels.fruit_module,
        "reusable": _savedmodels.reusable_module,
        "fixed": fixed_callable_module,
        "twice": two_dtype_module,
    }
    return {
        name: load_module(build(root / name), handle=f"test/{name}")
        for name, build in builders.items()
    }


@pytest.fixture
def ops(models: dict[str, Module]) -> Module:
    return models["ops"]


@pytest.fixture
def fruit(models: dict[str, Module]) -> Module:
    return models["fruit"]


def spy_calls(monkeypatch: pytest.MonkeyPatch, b: Batched) -> list[int]:
    """Record the rows of every call the batcher makes (a joined batch, or one request)."""
    rows: list[int] = []
    original = b._call

    def spy(payload: Any) -> Any:
        first = next(iter(payload.values())) if isinstance(payload, dict) else payload
        rows.append(int(first.shape[0]))
        return original(payload)

    monkeypatch.setattr(b, "_call", spy)
    return rows


class HeldThreads:
    """Holds every worker thread of a module on the running loop, so requests queue."""

    def __init__(self, m: Module) -> None:
        self._limiter = loop_threads(m)
        self._tokens: list[object] = []

    async def __aenter__(self) -> HeldThreads:
        for _ in range(int(self._limiter.total_tokens)):
            token = object()
            await self._limiter.acquire_on_behalf_of(token)
            self._tokens.append(token)
        return self

    def release(self) -> None:
        while self._tokens:
            self._limiter.release_on_behalf_of(self._tokens.pop())

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def close(got: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected)
        for key in expected:
            close(got[key], expected[key])
        return
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


# --- acall ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_acall_returns_and_raises_what_the_call_does(
    models: dict[str, Module], tf: Any
) -> None:
    fruit, reusable = models["fruit"], models["reusable"]
    x = tf.constant([[1.0, 2.0, 3.0]])
    close(await fruit.acall(x), fruit(x))
    close(
        await fruit.acall(x, signature="default", as_dict=True),
        fruit(x, signature="default", as_dict=True),
    )
    pets = {"apples": [1.0, 2.0], "oranges": [3.0, 4.0]}
    close(
        await fruit.acall(pets, signature="fruit_to_pet", as_dict=True),
        fruit(pets, signature="fruit_to_pet", as_dict=True),
    )
    # Keyword arguments reach the callable object, as with m(x).
    two = np.ones([1, 2], np.float32)
    close(await reusable.acall(two, training=True), reusable(two, training=True))
    mistakes: list[tuple[Any, dict[str, Any]]] = [
        ({"apples": [1.0]}, {"signature": "fruit_to_pet", "as_dict": True}),
        (x, {"signature": "nope"}),
        (x, {"signature": "default", "training": True}),
    ]
    for inputs, options in mistakes:
        with pytest.raises(SignatureError) as sync_error:
            fruit(inputs, **options)
        with pytest.raises(SignatureError) as async_error:
            await fruit.acall(inputs, **options)
        assert str(async_error.value) == str(sync_error.value)


def _spin_calibrated(ops: Module, tf: Any, seconds: float) -> tuple[Any, float]:
    """Inputs for ``spin`` that make one call last about ``seconds``; and how long it took."""
    x = tf.ones([64, 64]) / 64.0
    n = 50
    while True:
        started = time.perf_counter()
        ops({"x": x, "n": n}, signature="spin")
        took = time.perf_counter() - started
        if took >= seconds or n > 10_000_000:
            return {"x": x, "n": tf.constant(n)}, took
        n = int(n * min(10.0, max(1.5, seconds / max(took, 1e-4))))


@pytest.mark.anyio
async def test_acall_keeps_the_loop_running(ops: Module, tf: Any) -> None:
    inputs, _ = _spin_calibrated(ops, tf, 0.5)
    took: dict[str, float] = {}

    async def blocking() -> None:
        started = time.perf_counter()
        ops(inputs, signature="spin")
        took["blocking"] = time.perf_counter() - started

    async def in_thread() -> None:
        started = time.perf_counter()
        await ops.acall(inputs, signature="spin")
        took["acall"] = time.perf_counter() - started

    blocked = await largest_gap(blocking)
    free = await largest_gap(in_thread)
    # Calling from the loop stalls it for the whole call; acall for a small part of it
    # at most (a few ms on an idle machine; the bound leaves room for a busy one).
    assert blocked >= 0.9 * took["blocking"]
    assert free < 0.25 * took["acall"], (free, took)


@pytest.mark.anyio
async def test_acall_cancelled_waits_for_its_call_and_leaves_nothing_held(
    ops: Module, tf: Any
) -> None:
    inputs, took = _spin_calibrated(ops, tf, 0.2)
    limiter = loop_threads(ops)
    started = time.perf_counter()
    with anyio.move_on_after(0.02) as scope:
        await ops.acall(inputs, signature="spin")
    assert scope.cancelled_caught
    # TensorFlow cannot be interrupted: the cancelled call returned once it had ended,
    # and gave its thread back.
    assert time.perf_counter() - started > 0.5 * took
    assert limiter.borrowed_tokens == 0
    x = tf.ones([2, 4])
    results: list[Any] = []
    async with anyio.create_task_group() as tg:
        for _ in range(THREADS + 2):
            tg.start_soon(_append, results, ops.acall(x))
    for y in results:
        close(y, ops(x))


async def _append(results: list[Any], awaitable: Any) -> None:
    results.append(await awaitable)


# --- batched: results -----------------------------------------------------------------


def _rows(tf: Any, rng: random.Random, n: int, width: int = 4) -> Any:
    """n rows of ``width`` floats as a tensor, a numpy array or a list, at random."""
    values = np.array([[rng.uniform(-2, 2) for _ in range(width)] for _ in range(n)], np.float32)
    values = values.reshape(n, width)
    kind = rng.randrange(3) if n else 1  # an empty list would lose its row shape
    return tf.constant(values) if kind == 0 else values if kind == 1 else values.tolist()


@pytest.mark.anyio
@pytest.mark.parametrize("signature", [None, "checked"])
async def test_batched_many_mixed_requests_equal_per_row_calls(
    ops: Module, tf: Any, monkeypatch: pytest.MonkeyPatch, signature: str | None
) -> None:
    b = ops.batched(signature, max_batch_size=16)
    calls = spy_calls(monkeypatch, b)
    rng = random.Random(7)
    # Mostly small requests, some empty, some bigger than a batch (they run alone).
    sizes = [rng.choice([1, 1, 1, 2, 3, 5, 8, 0, 20]) for _ in range(300)]
    requests = [_rows(tf, rng, n) for n in sizes]
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await b(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    for i, x in enumerate(requests):
        close(results[i], ops(x, signature=signature))
    assert sum(calls) == sum(sizes)
    assert max(calls) == 20  # a request bigger than max_batch_size ran alone
    assert all(rows <= 16 for rows in calls if rows != 20)
    assert len(calls) < len(requests) / 2, calls  # requests were joined


@pytest.mark.anyio
async def test_batched_dict_signature_with_as_dict(
    fruit: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = fruit.batched("fruit_to_pet", as_dict=True)
    calls = spy_calls(monkeypatch, b)
    rng = random.Random(3)
    requests = []
    for _ in range(120):
        n = rng.randint(1, 6)
        apples = [rng.uniform(0, 5) for _ in range(n)]
        oranges = tf.constant([rng.uniform(0, 5) for _ in range(n)])
        requests.append({"apples": apples, "oranges": oranges})
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await b(requests[i])

    async with HeldThreads(fruit) as held, anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
        held.release()
    for i, request in enumerate(requests):
        close(results[i], fruit(request, signature="fruit_to_pet", as_dict=True))
    assert len(calls) <= math.ceil(sum(calls) / 64) + 2
    # Inputs that disagree on their rows are not joined with others, but run (alone).
    odd = {"apples": [1.0, 2.0], "oranges": [5.0]}
    close(await b(odd), fruit(odd, signature="fruit_to_pet", as_dict=True))
    # The callable object and a one-input signature, with and without as_dict.
    x = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(await fruit.batched(as_dict=True)(x), fruit(x, as_dict=True))
    close(await fruit.batched("default")(x), fruit(x, signature="default"))
    close(
        await fruit.batched("default", as_dict=True)({"x": x}),
        fruit({"x": x}, signature="default", as_dict=True),
    )


@pytest.mark.anyio
async def test_batched_joins_only_equal_row_shapes_and_dtypes(
    models: dict[str, Module], tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, twice = models["ops"], models["twice"]
    by_width = ops.batched("totals", as_dict=True)
    widths: list[int] = []
    original = by_width._call

    def spy(payload: Any) -> Any:
        widths.append(int(payload.shape[1]))
        return original(payload)

    monkeypatch.setattr(by_width, "_call", spy)
    by_dtype = twice.batched()
    # A join of two dtypes would fail, then run each request alone: 40 calls.
    dtypes = spy_calls(monkeypatch, by_dtype)
    requests = [np.full([1 + i % 3, 2 + i % 2], i, np.float32) for i in range(40)]
    typed = [tf.constant([[i, i]], dtype=tf.int32 if i % 2 else tf.float32) for i in range(40)]
    got: dict[tuple[str, int], Any] = {}

    async def one(kind: str, i: int) -> None:
        if kind == "width":
            got[kind, i] = await by_width(requests[i])
        else:
            got[kind, i] = await by_dtype(typed[i])

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(one, "width", i)
            tg.start_soon(one, "dtype", i)
    for i in range(40):
        close(got["width", i], ops(requests[i], signature="totals", as_dict=True))
        close(got["dtype", i], twice(typed[i]))
    assert set(widths) == {2, 3} and len(widths) < 40
    assert len(dtypes) < 40


# --- batched: errors ------------------------------------------------------------------


@pytest.mark.anyio
async def test_batched_bad_requests_fail_alone(
    ops: Module, fruit: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = ops.batched("checked", as_dict=True)
    calls = spy_calls(monkeypatch, b)
    good = [np.full([2, 4], i, np.float32) for i in range(30)]
    bad: list[Any] = [
        np.ones([2, 5], np.float32),  # wrong row size
        tf.ones([2, 4], tf.float64),  # wrong dtype
        {"y": np.ones([2, 4], np.float32)},  # unknown input name
        "not numbers",
    ]
    poisoned = np.full([2, 4], np.nan, np.float32)  # binds, and fails when run
    outcome: dict[str, Any] = {}

    async def one(name: str, x: Any) -> None:
        try:
            outcome[name] = await b(x)
        except Exception as exc:
            outcome[name] = exc

    async with HeldThreads(ops) as held, anyio.create_task_group() as tg:
        for i, x in enumerate(good):
            tg.start_soon(one, f"good{i}", x)
        for i, x in enumerate(bad):
            tg.start_soon(one, f"bad{i}", x)
        tg.start_soon(one, "poisoned", poisoned)
        await anyio.wait_all_tasks_blocked()
        held.release()
    for i, x in enumerate(good):
        close(outcome[f"good{i}"], ops(x, signature="checked", as_dict=True))
    for i, x in enumerate(bad):
        with pytest.raises(SignatureError) as expected:
            ops(x, signature="checked", as_dict=True)
        assert isinstance(outcome[f"bad{i}"], SignatureError)
        assert str(outcome[f"bad{i}"]) == str(expected.value)
    # The poisoned request failed the joined call, then alone, with TensorFlow's error.
    assert type(outcome["poisoned"]).__name__ == "InvalidArgumentError"
    assert "NaN or Inf in x" in str(outcome["poisoned"])
    assert calls[0] == 62 and sorted(calls[1:]) == [2] * 31  # one try, then one by one


@pytest.mark.anyio
async def test_batched_refuses_what_cannot_be_batched(models: dict[str, Module]) -> None:
    ops, fruit, fixed = models["ops"], models["fruit"], models["fixed"]
    with pytest.raises(SignatureError, match=r"signature 'fixed'.*shape \[3\].*no leading batch"):
        ops.batched("fixed")
    with pytest.raises(SignatureError, match=r"'scalar'.*shape \[\].*no leading batch"):
        ops.batched("scalar", as_dict=True)
    with pytest.raises(SignatureError, match=r"'spin'.*input 'n'.*no leading batch"):
        ops.batched("spin", as_dict=True)
    with pytest.raises(SignatureError, match=r"callable object.*shape \[1, 3\].*no leading"):
        fixed.batched()
    with pytest.raises(SignatureError, match="pass as_dict=True"):
        fruit.batched("fruit_to_pet")
    with pytest.raises(SignatureError, match="has no signature 'nope'"):
        fruit.batched("nope")
    for bad in (
        {"max_batch_size": 0},
        {"max_delay": -1},
        {"max_delay": math.inf},
        {"max_queue": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fruit.batched(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_batch_size"):
        fruit.batched(max_batch_size=2.5)  # type: ignore[arg-type]
    b = fruit.batched("default", max_batch_size=8)
    assert fruit.batched("default", max_batch_size=8) is b
    assert fruit.batched("default", max_batch_size=9) is not b
    assert "signature 'default'" in repr(b) and "max_batch_size=8" in repr(b)


# --- batched: cancellation and overload -----------------------------------------------


@pytest.mark.anyio
async def test_cancelled_waiters_leave_the_queue_and_disturb_no_one(
    ops: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = ops.batched(max_delay=0.2, max_batch_size=64)
    calls = spy_calls(monkeypatch, b)
    requests = [np.full([1 + i % 2, 4], i, np.float32) for i in range(20)]
    scopes = [anyio.CancelScope() for _ in requests]
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        with scopes[i]:
            results[i] = await b(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
        # Request 0 leads the batch (it waits out the window); it goes too.
        for i in range(0, 20, 3):
            scopes[i].cancel()
    kept = [i for i in range(20) if i % 3]
    assert sorted(results) == kept
    for i in kept:
        close(results[i], ops(requests[i]))
    assert calls == [sum(len(requests[i]) for i in kept)]


@pytest.mark.anyio
async def test_cancelling_waiters_of_a_running_batch(ops: Module, tf: Any) -> None:
    b = ops.batched("slow", as_dict=True, max_delay=0.01)
    requests = [np.full([1, 4], i, np.float32) for i in range(10)]
    scopes = [anyio.CancelScope() for _ in requests]
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        with scopes[i]:
            results[i] = await b(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
        while loop_threads(ops).borrowed_tokens == 0:  # until the batch is cut and running
            await anyio.sleep(0.001)
        for i in range(0, 10, 2):
            scopes[i].cancel()
    # The leader (0) was cancelled too: the batch still ran for the others.
    assert sorted(results) == [1, 3, 5, 7, 9]
    for i in results:
        close(results[i]["y"], tf.constant(requests[i]))
    assert loop_threads(ops).borrowed_tokens == 0


@pytest.mark.anyio
async def test_overload_fails_fast_past_max_queue(ops: Module, tf: Any) -> None:
    b = ops.batched(max_batch_size=4, max_queue=8)
    x = np.ones([2, 4], np.float32)
    results: list[Any] = []
    scopes = [anyio.CancelScope() for _ in range(4)]

    async def one(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await b(x))

    async with HeldThreads(ops) as held, anyio.create_task_group() as tg:
        for scope in scopes:  # 8 rows wait for a thread
            tg.start_soon(one, scope)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(QueueFullError, match=r"8 rows are already waiting.*max_queue=8"):
            await b(x)
        with pytest.raises(QueueFullError):
            await b(np.ones([9, 4], np.float32))  # also a request that would run alone
        # A waiter that gives up makes room again.
        scopes[3].cancel()
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(_append, results, b(x))
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(QueueFullError):
            await b(x)
        held.release()
    assert len(results) == 4
    for y in results:
        close(y, ops(x))


@pytest.mark.anyio
async def test_without_max_queue_requests_wait_their_turn(ops: Module, tf: Any) -> None:
    b = ops.batched(max_batch_size=32)
    x = np.ones([1, 4], np.float32)
    results: list[Any] = []
    async with HeldThreads(ops) as held, anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(_append, results, b(x))
        await anyio.wait_all_tasks_blocked()
        assert results == []  # all waiting: back-pressure is the await itself
        held.release()
    assert len(results) == 500
    expected = ops(x).numpy()
    assert all(np.array_equal(y.numpy(), expected) for y in results)


# --- several loops ------------------------------------------------------------------


def test_one_module_serves_loops_in_several_threads(ops: Module, tf: Any) -> None:
    b = ops.batched(max_batch_size=8)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = ops(x).numpy()
    failures: list[BaseException] = []

    async def work() -> None:
        results: list[Any] = []
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(_append, results, b(x) if i % 2 else ops.acall(x))
        assert all(np.allclose(y.numpy(), expected) for y in results)

    def run(backend: str) -> None:
        try:
            anyio.run(work, backend=backend)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in ("asyncio", "trio", "asyncio")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []


# --- variables ------------------------------------------------------------------------


def test_variables_of_a_plain_tf_module_export(models: dict[str, Module]) -> None:
    ops, fruit, reusable = models["ops"], models["fruit"], models["reusable"]
    assert not hasattr(ops.obj, "variables")
    names = sorted(v.name for v in ops.variables)
    assert names == ["b:0", "big:0", "calls:0", "w:0"]  # w once, though tracked twice
    assert sorted(v.name for v in ops.trainable_variables) == ["b:0", "big:0", "w:0"]
    assert [id(v) for v in ops.variables] == [id(v) for v in ops.variables]
    assert [v.name for v in fruit.variables] == [v.name for v in fruit.trainable_variables]
    assert len(fruit.variables) == 1 and float(fruit.variables[0].numpy()) == 2.0
    # The reusable form's own attributes still decide.
    assert [v.name for v in reusable.variables] == ["w:0", "step:0"]
    assert [v.name for v in reusable.trainable_variables] == ["w:0"]
