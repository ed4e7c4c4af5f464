"""What users pass: numpy arrays, lists and numbers take the fast path, with the same
results and errors as the general path, in ``m(x)``, ``acall`` and ``batched``.

Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from asynchub import SignatureError
from asynchub._batching import join
from asynchub._module import Module, load_module

from . import _savedmodels
from .test_module import general_calls

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def fruit_path(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _savedmodels.fruit_module(tmp_path_factory.mktemp("fruit") / "m")


@pytest.fixture
def fruit(fruit_path: Path) -> Module:
    """A fresh Module (no plans yet) of the fruit model: callable, two signatures."""
    return load_module(fruit_path, handle="hub/fruit/1")


@pytest.fixture(scope="module")
def plus(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Module:
    """A non-callable module whose signature maps ``x: float32[?]`` to ``{"output": x + 0}``."""
    path = tmp_path_factory.mktemp("plus") / "m"
    return load_module(_savedmodels.signatures_module(path, ["serving_default"]), handle="plus")


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(SignatureError) as info:
        call()
    return str(info.value)


# --- m(x) -------------------------------------------------------------------------------


@pytest.mark.parametrize("signature", [None, "default"])
def test_numpy_and_lists_take_the_fast_path(
    fruit: Module, tf: Any, monkeypatch: pytest.MonkeyPatch, signature: str | None
) -> None:
    row = np.array([[1.0, 2.0, 3.0]], np.float32)
    expected = fruit(tf.constant(row), signature=signature).numpy()
    general = general_calls(monkeypatch, fruit, signature)
    for value in (
        row,
        row.astype(np.float64),  # converted to float32, as tf.convert_to_tensor does
        row.tolist(),
        np.asfortranarray(np.array([[1.0, 2.0, 3.0]], np.float32)),
        np.array([[9.0, 1.0, 2.0, 3.0]], np.float32)[:, 1:],  # not contiguous
    ):
        got = fruit(value, signature=signature)
        assert isinstance(got, tf.Tensor)
        np.testing.assert_array_equal(got.numpy(), expected)
    assert general == []  # every one served fast: the shape was seen
    fruit(np.ones([4, 3], np.float32), signature=signature)  # a new shape: general once
    fruit(np.ones([4, 3], np.float32), signature=signature)
    assert len(general) == 1


def test_numpy_in_a_dict_takes_the_fast_path(
    fruit: Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = {"apples": np.array([1.0, 2.0], np.float32), "oranges": [3.0, 4.0]}
    first = fruit(inputs, signature="fruit_to_pet", as_dict=True)
    general = general_calls(monkeypatch, fruit, "fruit_to_pet")
    again = fruit(inputs, signature="fruit_to_pet", as_dict=True)
    assert general == []
    assert again["cats"].numpy().tolist() == first["cats"].numpy().tolist() == [4.0, 6.0]
    assert again["dogs"].numpy().tolist() == [6.0, 16.0]


@pytest.mark.parametrize("signature", [None, "default"])
def test_host_values_fail_as_the_general_path_fails(
    fruit_path: Path, tf: Any, signature: str | None
) -> None:
    bad: list[Any] = [
        np.ones([1, 4], np.float32),  # wrong row shape
        np.ones([3], np.float32),  # wrong rank
        [[1.0, 2.0], [3.0]],  # not rectangular
        np.array([["a", "b", "c"]]),  # strings for a float input
        [["a", "b", "c"]],
    ]
    fresh = load_module(fruit_path, handle="hub/fruit/1")
    taught = load_module(fruit_path, handle="hub/fruit/1")
    taught(np.ones([1, 3], np.float32), signature=signature)
    taught(np.ones([1, 3], np.float32), signature=signature)  # the fast path is set up
    for value in bad:
        expected = _error(lambda value=value: fresh(value, signature=signature))
        assert "hub/fruit/1" in expected
        assert _error(lambda value=value: taught(value, signature=signature)) == expected
    # and a good value still works afterwards
    assert taught([[1.0, 1.0, 1.0]], signature="default").numpy().tolist() == [6.0]


def test_the_result_never_shares_the_callers_array(plus: Module) -> None:
    # x + 0 may be compiled to an identity: the output could then alias the input.
    x = np.array([1.0, 2.0], np.float32)
    plus(x)
    y = plus(x)  # served by the fast path
    x[:] = 99.0
    assert y.numpy().tolist() == [1.0, 2.0]


def test_numpy_inside_a_tf_function_stays_symbolic(fruit: Module, tf: Any) -> None:
    row = np.array([[1.0, 2.0, 3.0]], np.float32)
    fruit(row)  # the fast path knows this shape
    fruit(row, signature="default")

    @tf.function
    def f() -> Any:
        return fruit(row) + 0.0, fruit(row, signature="default")

    by_obj, by_sig = f()
    assert by_obj.numpy().tolist() == [[2.0, 4.0, 6.0]]
    assert by_sig.numpy().tolist() == [12.0]


# --- acall and batched ------------------------------------------------------------------


@pytest.mark.anyio
async def test_acall_on_numpy(fruit: Module) -> None:
    row = np.array([[1.0, 2.0, 3.0]], np.float32)
    assert (await fruit.acall(row)).numpy().tolist() == [[2.0, 4.0, 6.0]]
    assert (await fruit.acall(row.tolist(), signature="default")).numpy().tolist() == [12.0]


async def _gather(b: Any, inputs: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(inputs)

    async def one(i: int) -> None:
        try:
            out[i] = await b(inputs[i])
        except SignatureError as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)
    return out


def _payloads(b: Any) -> list[Any]:
    """Record what each of batcher ``b``'s calls of the module is given."""
    seen: list[Any] = []
    inner = b._call

    def call(payload: Any) -> Any:
        seen.append(payload)
        return inner(payload)

    b._call = call
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize("signature", [None, "default"])
async def test_batched_joins_numpy_rows_into_one_array(
    fruit: Module, tf: Any, signature: str | None
) -> None:
    b = fruit.batched(signature, max_delay=0.05)
    rows = [np.full([1, 3], i, np.float32) for i in range(12)]
    await b(rows[0])  # binds the first one the general way; later ones are passed on
    payloads = _payloads(b)
    results = await _gather(b, rows)
    for row, got in zip(rows, results, strict=True):
        expected = fruit(tf.constant(row), signature=signature)
        assert isinstance(got, tf.Tensor) and got.shape == expected.shape
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    # One call per batch, given one numpy array of every row: joined with numpy.
    assert [type(p) for p in payloads] == [np.ndarray] * len(payloads)
    assert sum(p.shape[0] for p in payloads) == 12 and len(payloads) < 12


@pytest.mark.anyio
async def test_batched_mixes_numpy_tensors_lists_and_other_dtypes(fruit: Module, tf: Any) -> None:
    b = fruit.batched("default", max_delay=0.05)
    inputs: list[Any] = []
    for i in range(16):
        row = np.full([1, 3], i, np.float32)
        inputs.append(
            [row, tf.constant(row), row.tolist(), row.astype(np.float64), np.repeat(row, 2, 0)][
                i % 5
            ]
        )
    payloads = _payloads(b)
    results = await _gather(b, inputs)
    for value, got in zip(inputs, results, strict=True):
        expected = fruit(value, signature="default")
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    assert sum(int(p.shape[0]) for p in payloads) == sum(len(v) for v in inputs)
    assert len(payloads) < len(inputs)  # they were joined


@pytest.mark.anyio
async def test_a_bad_numpy_request_fails_alone_as_m_x_does(fruit: Module) -> None:
    b = fruit.batched("default", max_delay=0.05)
    good = np.ones([1, 3], np.float32)
    bad = np.ones([1, 4], np.float32)
    await b(good)
    results = await _gather(b, [good, bad, good, [["x", "y", "z"]]])
    assert [r.numpy().tolist() for r in (results[0], results[2])] == [[6.0], [6.0]]
    assert str(results[1]) == _error(lambda: fruit(bad, signature="default"))
    assert str(results[3]) == _error(lambda: fruit([["x", "y", "z"]], signature="default"))


def test_join_is_one_concatenate_for_arrays_of_one_dtype(tf: Any) -> None:
    rows = [np.full([1, 2], i, np.float32) for i in range(3)]
    joined = join(rows, tf)
    assert type(joined) is np.ndarray and joined.tolist() == [[0, 0], [1, 1], [2, 2]]
    mixed = join([rows[0], tf.constant(rows[1]), rows[2]], tf)
    assert isinstance(mixed, tf.Tensor) and mixed.numpy().tolist() == joined.tolist()
    two = join([{"a": rows[0], "b": tf.constant(rows[1])}, {"a": rows[1], "b": rows[2]}], tf)
    assert type(two["a"]) is np.ndarray and isinstance(two["b"], tf.Tensor)


@pytest.mark.anyio
async def test_batched_as_numpy_gives_what_numpy_of_m_x_gives(fruit: Module) -> None:
    b = fruit.batched("default", max_delay=0.05, as_dict=True, as_numpy=True)
    assert b is fruit.batched("default", max_delay=0.05, as_dict=True, as_numpy=True)
    assert b is not fruit.batched("default", max_delay=0.05, as_dict=True)
    rows = [np.full([1 + i % 2, 3], i, np.float32) for i in range(10)]
    payloads = _payloads(b)
    results = await _gather(b, rows)
    for row, got in zip(rows, results, strict=True):
        expected = fruit(row, signature="default", as_dict=True)
        assert set(got) == set(expected)
        for name, value in got.items():
            assert type(value) is np.ndarray
            np.testing.assert_array_equal(value, expected[name].numpy())
    assert len(payloads) < len(rows)
    alone = await fruit.batched(as_numpy=True)(np.ones([1, 3], np.float32))  # callable object
    assert type(alone) is np.ndarray and alone.tolist() == [[2.0, 2.0, 2.0]]
