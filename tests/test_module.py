"""Module: loading SavedModels, applying them, and the hot path's plan and fallback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asynchub import HubError, MissingDependencyError, ModuleError, SignatureError
from asynchub._module import (
    Module,
    SignatureInfo,
    default_output,
    default_signature,
    load_module,
)
from asynchub._tf import INSTALL_HINT, import_tensorflow

from . import _savedmodels

# --- no TensorFlow needed -------------------------------------------------------------


def test_missing_tensorflow_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(MissingDependencyError) as info:
        import_tensorflow()
    assert INSTALL_HINT in str(info.value)
    assert 'pip install "asynchub[tensorflow]"' in str(info.value)
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a", "serving_default", "default"], "default"),
        (["a", "serving_default", "b"], "serving_default"),
        (["only"], "only"),
    ],
)
def test_default_signature_order(names: list[str], expected: str) -> None:
    assert default_signature(names, handle="h") == expected


def test_default_signature_ambiguous_lists_what_exists() -> None:
    with pytest.raises(SignatureError, match=r"not callable.*one of: a, b") as info:
        default_signature(["b", "a"], handle="my/handle")
    assert info.value.handle == "my/handle"
    with pytest.raises(SignatureError, match="no signatures"):
        default_signature([], handle="h")


def test_default_output_rules() -> None:
    assert default_output(["extra", "default"]) == "default"
    assert default_output(["output_0"]) == "output_0"
    assert default_output(["cats", "dogs"]) is None


def test_dir_without_saved_model_lists_its_contents(tmp_path: Path) -> None:
    (tmp_path / "variables").mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    with pytest.raises(ModuleError) as info:
        load_module(tmp_path, handle="https://example.com/m/1")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "https://example.com/m/1" in message
    assert "saved_model.pb" in message
    assert "README.txt" in message and "variables/" in message
    assert info.value.handle == "https://example.com/m/1"


def test_dir_with_nested_model_suggests_it(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ModuleError, match=r"did you mean .*model"):
        load_module(tmp_path, handle="h")


def test_tf1_hub_format_is_named(tmp_path: Path) -> None:
    (tmp_path / "tfhub_module.pb").write_bytes(b"")
    with pytest.raises(ModuleError, match="TF1 Hub format"):
        load_module(tmp_path, handle="h")


def test_importing_asynchub_does_not_import_tensorflow() -> None:
    code = (
        "import sys, asynchub, asynchub._module, asynchub._tf; "
        "sys.exit('tensorflow' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_missing_dir_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="does not exist"):
        load_module(tmp_path / "nope", handle="h")
    with pytest.raises(ModuleError, match="it is empty"):
        load_module(tmp_path, handle="h")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModuleError, match="is not a directory"):
        load_module(tmp_path / "file", handle="h")


# --- fixtures: SavedModels built once per test module ---------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def build(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build a SavedModel with one of the _savedmodels builders, once per argument list."""
    built: dict[tuple[Any, ...], Path] = {}

    def get(builder: Callable[..., Path], *args: Any) -> Path:
        key = (builder.__name__, *map(repr, args))
        if key not in built:
            built[key] = builder(tmp_path_factory.mktemp(builder.__name__) / "m", *args)
        return built[key]

    return get


@pytest.fixture(scope="module")
def fruit_obj(tf: Any, build: Callable[..., Path]) -> Any:
    return tf.saved_model.load(str(build(_savedmodels.fruit_module)))


@pytest.fixture
def fruit(fruit_obj: Any, build: Callable[..., Path]) -> Module:
    """A fresh Module (no plans yet) around the once-loaded fruit model."""
    return Module(fruit_obj, path=build(_savedmodels.fruit_module), handle="hub/fruit/1")


@pytest.fixture(scope="module")
def reusable_obj(tf: Any, build: Callable[..., Path]) -> Any:
    return tf.saved_model.load(str(build(_savedmodels.reusable_module)))


@pytest.fixture
def reusable(reusable_obj: Any, build: Callable[..., Path]) -> Module:
    return Module(reusable_obj, path=build(_savedmodels.reusable_module), handle="hub/reusable")


def general_calls(monkeypatch: pytest.MonkeyPatch, m: Module, key: str | None) -> list[Any]:
    """Record each call that takes the general path of ``m``'s plan for ``key``."""
    plan = m._plans[key]
    calls: list[Any] = []
    original = plan._call_general  # type: ignore[attr-defined]

    def spy(inputs: Any, kwargs: dict[str, Any]) -> Any:
        calls.append(inputs)
        return original(inputs, kwargs)

    monkeypatch.setattr(plan, "_call_general", spy)
    return calls


# --- loading --------------------------------------------------------------------------


@pytest.mark.tf
def test_load_module_wraps_the_loaded_object(tf: Any, build: Callable[..., Path]) -> None:
    path = build(_savedmodels.fruit_module)
    m = load_module(path, handle="hub/fruit/1")
    assert m.path == path and m.handle == "hub/fruit/1"
    assert callable(m.obj) and set(m.obj.signatures) == {"default", "fruit_to_pet"}
    assert repr(m) == (
        "Module(handle='hub/fruit/1', signatures=['default', 'fruit_to_pet'], callable=True)"
    )


@pytest.mark.tf
def test_corrupt_saved_model_is_a_module_error(tf: Any, tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"\x00garbage, not a protobuf\xff" * 10)
    with pytest.raises(ModuleError, match="could not load") as info:
        load_module(tmp_path, handle="h")
    assert info.value.__cause__ is not None
    assert isinstance(info.value, HubError)


@pytest.mark.tf
@pytest.mark.parametrize(
    ("tags", "expected"), [(["serve"], 3.0), ({"train"}, 30.0), ("serve", 3.0)]
)
def test_tags_select_the_meta_graph(
    tf: Any, build: Callable[..., Path], tags: Any, expected: float
) -> None:
    m = load_module(build(_savedmodels.two_tag_module), handle="h", tags=tags)
    x = np.ones([1, 2], np.float32)
    assert m(x).numpy().tolist() == [[expected]]
    assert [v.name for v in m.variables] == ["w:0"]


@pytest.mark.tf
def test_tags_missing_or_unknown_are_module_errors(tf: Any, build: Callable[..., Path]) -> None:
    path = build(_savedmodels.two_tag_module)
    with pytest.raises(ModuleError, match="tags="):
        load_module(path, handle="h")
    with pytest.raises(ModuleError, match=r"with tags=\['gpu'\].*serve"):
        load_module(path, handle="h", tags=["gpu"])


# --- which function a call without signature= reaches ---------------------------------


@pytest.mark.tf
def test_callable_object_comes_first(fruit: Module, tf: Any) -> None:
    x = tf.constant([[1.0, 2.0, 3.0]])
    assert fruit(x).numpy().tolist() == [[2.0, 4.0, 6.0]]  # __call__, not "default"
    assert fruit(x, as_dict=True)["default"].numpy().tolist() == [[2.0, 4.0, 6.0]]


@pytest.mark.tf
@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a", "serving_default", "default"], 2.0),
        (["a", "serving_default", "b"], 1.0),
        (["only"], 0.0),
    ],
)
def test_non_callable_default_resolution(
    build: Callable[..., Path], names: list[str], expected: float
) -> None:
    m = load_module(build(_savedmodels.signatures_module, names), handle="h")
    assert not callable(m.obj)
    assert m([0.0]).numpy().tolist() == [expected]  # x + index of the signature chosen


@pytest.mark.tf
def test_non_callable_without_default_lists_signatures(build: Callable[..., Path]) -> None:
    m = load_module(build(_savedmodels.signatures_module, ["b", "a"]), handle="h")
    with pytest.raises(SignatureError, match="one of: a, b"):
        m([0.0])
    assert m([0.0], signature="a").numpy().tolist() == [1.0]


# --- binding inputs -------------------------------------------------------------------


@pytest.mark.tf
def test_dict_binds_by_name(fruit: Module, tf: Any) -> None:
    out = fruit(
        {"oranges": tf.constant([3.0, 4.0]), "apples": tf.constant([1.0, 2.0])},
        signature="fruit_to_pet",
        as_dict=True,
    )
    assert set(out) == {"cats", "dogs"}
    assert out["cats"].numpy().tolist() == [4.0, 6.0]
    assert out["dogs"].numpy().tolist() == [6.0, 16.0]


@pytest.mark.tf
def test_single_value_binds_to_single_input(fruit: Module, tf: Any) -> None:
    out = fruit(tf.constant([[1.0, 2.0, 3.0]]), signature="default")
    assert out.numpy().tolist() == [12.0]


@pytest.mark.tf
def test_lists_and_numpy_are_converted_to_the_input_dtype(fruit: Module, tf: Any) -> None:
    out = fruit(
        {"apples": [1, 2], "oranges": np.array([3.0, 4.0], np.float64)},
        signature="fruit_to_pet",
        as_dict=True,
    )
    assert out["cats"].dtype == tf.float32
    assert out["cats"].numpy().tolist() == [4.0, 6.0]


@pytest.mark.tf
def test_missing_input_names_missing_and_expected(fruit: Module) -> None:
    with pytest.raises(SignatureError) as info:
        fruit({"apples": [1.0]}, signature="fruit_to_pet", as_dict=True)
    message = str(info.value)
    assert "missing input(s) 'oranges'" in message
    assert "apples: float32[?]" in message and "oranges: float32[?]" in message
    assert info.value.handle == "hub/fruit/1"


@pytest.mark.tf
def test_unknown_input_is_an_error(fruit: Module) -> None:
    with pytest.raises(SignatureError, match="unknown input\\(s\\) 'pears'"):
        fruit({"apples": [1.0], "oranges": [1.0], "pears": [1.0]}, signature="fruit_to_pet")


@pytest.mark.tf
def test_lone_value_for_several_inputs_asks_for_a_dict(fruit: Module) -> None:
    with pytest.raises(SignatureError, match=r"takes 2 inputs.*pass a dict"):
        fruit([1.0], signature="fruit_to_pet", as_dict=True)


@pytest.mark.tf
def test_unknown_signature_lists_available(fruit: Module) -> None:
    with pytest.raises(SignatureError, match="no signature 'nope'; it has: default, fruit_to_pet"):
        fruit([1.0], signature="nope")


@pytest.mark.tf
def test_tensor_of_wrong_dtype_or_shape_is_an_error(fruit: Module, tf: Any) -> None:
    with pytest.raises(SignatureError, match="must be float32, got a float64 tensor"):
        fruit(tf.ones([1, 3], tf.float64), signature="default")
    with pytest.raises(SignatureError, match=r"must have shape \[\?, 3\], got \[1, 4\]"):
        fruit(tf.ones([1, 4]), signature="default")
    with pytest.raises(SignatureError, match="cannot be converted to float32"):
        fruit([["a", "b", "c"]], signature="default")


@pytest.mark.tf
def test_keyword_arguments_are_for_the_callable_only(fruit: Module, tf: Any) -> None:
    with pytest.raises(SignatureError, match="no keyword arguments, got: training"):
        fruit(tf.ones([1, 3]), signature="default", training=True)


# --- outputs --------------------------------------------------------------------------


@pytest.mark.tf
def test_as_dict_and_the_default_output(fruit: Module, tf: Any) -> None:
    x = tf.constant([[1.0, 1.0, 1.0]])
    everything = fruit(x, signature="default", as_dict=True)
    assert set(everything) == {"default", "extra"}
    assert everything["extra"].numpy().tolist() == [[2.0, 2.0, 2.0]]
    # The extra output is computed but not returned: the caller asked for "default".
    assert fruit(x, signature="default").numpy().tolist() == [6.0]


@pytest.mark.tf
def test_ambiguous_outputs_say_pass_as_dict(fruit: Module) -> None:
    with pytest.raises(SignatureError, match=r"cats, dogs.*pass as_dict=True"):
        fruit({"apples": [1.0], "oranges": [1.0]}, signature="fruit_to_pet")
    # A mistake in the inputs is reported first: it is the one to fix.
    with pytest.raises(SignatureError, match="missing input"):
        fruit({"apples": [1.0]}, signature="fruit_to_pet")


# --- the hot path ---------------------------------------------------------------------


@pytest.mark.tf
def test_fast_path_matches_raw_call_and_falls_back(
    fruit: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = fruit.obj.signatures["default"]
    x = tf.constant([[1.0, 2.0, 3.0]])
    first = fruit(x, signature="default", as_dict=True)  # general path; teaches the plan
    general = general_calls(monkeypatch, fruit, "default")
    second = fruit(x, signature="default", as_dict=True)
    assert general == []  # the fast path served it
    expected = raw(x=x)
    for out in (first, second):
        assert set(out) == set(expected)
        for name in expected:
            np.testing.assert_array_equal(out[name].numpy(), expected[name].numpy())

    # Host values of a shape seen before take the fast path too, converted once to
    # the input's dtype, as the general path would convert them.
    for value in (
        np.array([[1.0, 2.0, 3.0]], np.float64),  # numpy, and not the signature dtype
        [[1.0, 2.0, 3.0]],  # a list
    ):
        np.testing.assert_array_equal(
            fruit(value, signature="default").numpy(), expected["default"].numpy()
        )
    assert general == []

    # Unusual inputs leave the fast path and still give the same answer.
    unusual = [
        tf.Variable([[1.0, 2.0, 3.0]]),  # a variable, not a tensor
        np.array([[1.0, 2.0, 3.0]], np.float32).view(np.matrix),  # an ndarray subclass
    ]
    for value in unusual:
        np.testing.assert_array_equal(
            fruit(value, signature="default").numpy(), expected["default"].numpy()
        )
    assert len(general) == 2

    batch = tf.ones([5, 3])  # a shape not seen yet: general once, then fast
    assert fruit(batch, signature="default").numpy().tolist() == [6.0] * 5
    assert fruit(batch, signature="default").numpy().tolist() == [6.0] * 5
    assert len(general) == 3
    with pytest.raises(SignatureError):  # a bad shape is never let through
        fruit(tf.ones([5, 4]), signature="default")


@pytest.mark.tf
def test_fast_path_with_dict_inputs(
    fruit: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = {"apples": tf.constant([1.0, 2.0]), "oranges": tf.constant([3.0, 4.0])}
    fruit(inputs, signature="fruit_to_pet", as_dict=True)
    general = general_calls(monkeypatch, fruit, "fruit_to_pet")
    out = fruit(dict(reversed(inputs.items())), signature="fruit_to_pet", as_dict=True)
    assert general == []
    assert out["dogs"].numpy().tolist() == [6.0, 16.0]
    with pytest.raises(SignatureError, match="unknown input"):  # same size, wrong name
        fruit(
            {"apples": inputs["apples"], "pears": inputs["oranges"]},
            signature="fruit_to_pet",
            as_dict=True,
        )
    assert len(general) == 1


@pytest.mark.tf
def test_default_signature_shares_the_named_plan(build: Callable[..., Path], tf: Any) -> None:
    m = load_module(build(_savedmodels.signatures_module, ["serving_default"]), handle="h")
    m(tf.constant([1.0]))
    assert m._plans[None] is m._plans["serving_default"]


@pytest.mark.tf
def test_callable_fast_path_keys_on_keyword_values(
    reusable: Module, tf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = tf.constant([[1.0, 1.0]])
    assert reusable(x).numpy().tolist() == [[3.0]]
    assert reusable(x, training=True).numpy().tolist() == [[4.0]]
    general = general_calls(monkeypatch, reusable, None)
    assert reusable(x).numpy().tolist() == [[3.0]]
    assert reusable(x, training=True).numpy().tolist() == [[4.0]]
    assert reusable(x, training=False).numpy().tolist() == [[3.0]]
    assert len(general) == 1  # training=False was new; the others were served fast
    np.testing.assert_array_equal(reusable(x).numpy(), reusable.obj(x).numpy())
    # numpy is converted once to the dtype the callable takes, then served fast
    assert reusable(np.ones([1, 2], np.float64)).numpy().tolist() == [[3.0]]
    assert reusable([[1.0, 1.0]], training=True).numpy().tolist() == [[4.0]]
    assert len(general) == 1
    # a shape not seen yet takes the general way once
    assert reusable(np.ones([3, 2], np.float32)).numpy().tolist() == [[3.0]] * 3
    assert len(general) == 2


@pytest.mark.tf
def test_callable_fast_path_traces_once_for_every_batch_size(fruit: Module, tf: Any) -> None:
    # Binding to the input's exact shape traced a new function per batch size: ~1 s
    # each for MobileNetV2, paid again by every new size a batcher joins.
    function = fruit.obj.__call__
    before = function.experimental_get_tracing_count()
    for n in range(1, 12):
        x = tf.fill([n, 3], float(n))
        np.testing.assert_array_equal(fruit(x).numpy(), fruit(x).numpy())
        np.testing.assert_array_equal(fruit(x).numpy(), 2 * x.numpy())
    assert function.experimental_get_tracing_count() - before <= 1


@pytest.mark.tf
def test_callable_rejects_inputs_it_has_no_trace_for(reusable: Module, tf: Any) -> None:
    with pytest.raises(SignatureError, match=r"accepts \(float32\[\?, 2\]"):
        reusable(tf.ones([1, 3]))


@pytest.mark.tf
def test_gradients_flow_through_the_fast_paths(fruit: Module, reusable: Module, tf: Any) -> None:
    x = tf.constant([[1.0, 2.0, 3.0]])
    for _ in range(2):  # the second round takes the fast path
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fruit(x, signature="default")
        assert tape.gradient(y, x).numpy().tolist() == [[2.0, 2.0, 2.0]]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(reusable(tf.constant([[1.0, 3.0]])))
        (grad,) = tape.gradient(loss, reusable.trainable_variables)
        assert grad.numpy().tolist() == [[1.0], [3.0]]


@pytest.mark.tf
def test_works_inside_tf_function(fruit: Module, tf: Any) -> None:
    @tf.function
    def apply(x: Any) -> Any:
        return fruit(x, signature="default") + fruit(x)[:, 0]

    assert apply(tf.constant([[1.0, 2.0, 3.0]])).numpy().tolist() == [14.0]


# --- what a module shows --------------------------------------------------------------


@pytest.mark.tf
def test_signatures_are_printable_and_read_only(fruit: Module) -> None:
    info = fruit.signatures["fruit_to_pet"]
    assert isinstance(info, SignatureInfo)
    assert str(info) == (
        "fruit_to_pet(apples: float32[?], oranges: float32[?]) "
        "-> {cats: float32[?], dogs: float32[?]}"
    )
    assert repr(info) == f"<SignatureInfo {info}>"
    assert info.input_names == ("apples", "oranges")
    assert info.output_names == ("cats", "dogs")
    assert info.inputs[0].shape == (None,) and info.inputs[0].dtype == "float32"
    assert sorted(str(fruit.signatures).splitlines()) == [
        str(fruit.signatures["default"]),
        str(info),
    ]
    assert "fruit_to_pet(" in repr(fruit.signatures)
    with pytest.raises(TypeError):
        fruit.signatures["x"] = info  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"  # type: ignore[misc]


@pytest.mark.tf
def test_variables_and_regularization_losses(reusable: Module, fruit: Module) -> None:
    assert [v.name for v in reusable.variables] == ["w:0", "step:0"]
    assert [v.name for v in reusable.trainable_variables] == ["w:0"]
    losses = [float(loss()) for loss in reusable.regularization_losses]
    assert losses == [2.5]
    # A plain tf.Module saves none of these attributes: its variables are found by
    # walking the object graph (tests/test_module_async.py has more).
    assert [v.name for v in fruit.variables] == [v.name for v in fruit.trainable_variables]
    assert [float(v.numpy()) for v in fruit.variables] == [2.0]
    assert fruit.regularization_losses == []


# --- Keras 3 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_pair(build: Callable[..., Path]) -> tuple[Module, Module]:
    exported = load_module(build(_savedmodels.keras_exported), handle="keras/export")
    saved = load_module(build(_savedmodels.keras_saved), handle="keras/save")
    return exported, saved


@pytest.mark.tf
def test_keras_export(keras_pair: tuple[Module, Module], tf: Any) -> None:
    m, _ = keras_pair
    assert {"serve", "serving_default"} <= set(m.signatures)
    assert m.signatures["serving_default"].input_names == ("feats",)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = m.obj.signatures["serving_default"](feats=tf.constant(x))["output_0"]
    np.testing.assert_array_equal(m(x).numpy(), expected.numpy())
    np.testing.assert_array_equal(m({"feats": x}, signature="serve").numpy(), expected.numpy())
    assert sorted(v.name for v in m.trainable_variables) == ["dense/bias:0", "dense/kernel:0"]
    assert m.regularization_losses == []


@pytest.mark.tf
def test_keras_tf_saved_model_save(keras_pair: tuple[Module, Module]) -> None:
    exported, saved = keras_pair
    assert list(saved.signatures) == ["serving_default"]
    assert saved.signatures["serving_default"].input_names == ("inputs",)
    x = [[1.0, 2.0, 3.0, 4.0]]
    # Same seed, same weights: both ways of saving give the same function.
    np.testing.assert_allclose(saved(x).numpy(), exported(x).numpy(), rtol=1e-6)
