"""KerasLayer: hub modules fine-tuned in Keras 3, from a publisher's export to a consumer's fit.

The publisher builds a Keras model with a kernel regularizer and dropout, trains it on
digits 0-4, exports the feature extractor with asynchub's export, packs it and serves it
on 127.0.0.1; the consumer puts it under a new head and fine-tunes on all ten digits
(scikit-learn's bundled copy: nothing is downloaded).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asynchub.errors import ModuleError, SignatureError
from tests._httpserver import Server
from tests._savedmodels import fruit_module, reusable_module, signatures_module

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from asynchub._export import export  # noqa: E402  (needs TensorFlow, checked above)
from asynchub._keras import (  # noqa: E402
    KerasLayer,
    keras_variable_name,
    takes_training,
    unique_names,
)
from asynchub._pack import pack  # noqa: E402

#: The publisher's L2 factor on the feature kernel.
L2 = 1e-3


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, ...]
) -> tuple[Path, bytes]:
    """The publisher's feature extractor, exported (directory) and packed (archive bytes)."""
    x, y, _, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(
        32,
        activation="relu",
        kernel_regularizer=keras.regularizers.L2(L2),  # exported with the module
        name="features",
    )(inputs)
    features = keras.layers.Dropout(0.2, name="dropout")(hidden)
    # The publisher's own task (digits 0-4), so the consumer's weights start pre-trained.
    pretrain = keras.Model(inputs, keras.layers.Dense(5)(features))
    pretrain.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pretrain.fit(x[y < 5], y[y < 5], epochs=2, batch_size=64, verbose=0)

    tmp = tmp_path_factory.mktemp("publisher")
    path = export(keras.Model(inputs, features), tmp / "module")
    pack(path, tmp / "module.tar.gz")
    return path, (tmp / "module.tar.gz").read_bytes()


@pytest.fixture
def url(server: Server, cache_dir: Path, published: tuple[Path, bytes]) -> str:
    return server.add("/pub/1", body=published[1])


def consumer(layer: Any) -> Any:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((64,), name="pixels")
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(layer(inputs)))


def compile_(model: Any, optimizer: Any = None) -> Any:
    model.compile(
        optimizer or keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def snapshot(variables: list[Any]) -> dict[str, np.ndarray]:
    return {v.name: v.numpy().copy() for v in variables}


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def kernel(layer: KerasLayer) -> Any:
    (found,) = [v for v in layer.module.trainable_variables if "kernel" in v.name]
    return found


# --- the end-to-end story -----------------------------------------------------------


def test_fine_tuning_over_http(
    url: str, server: Server, digits: tuple[np.ndarray, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    x, y, x_test, y_test = digits
    layer = KerasLayer(url, trainable=True)
    assert layer.handle == url
    assert server.gets("/pub/1")  # fetched with asynchub, from the local server
    assert len(layer.trainable_weights) == 2  # kernel and bias
    (seed,) = layer.non_trainable_weights  # Dropout's seed generator state
    assert seed.name.endswith("seed_generator_state")

    model = compile_(consumer(layer))
    before = snapshot(layer.module.variables)
    acc_before = accuracy(model, x_test, y_test)
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    acc_after = accuracy(model, x_test, y_test)

    # The optimizer trained the module's own variables (the ones its functions use).
    after = snapshot(layer.module.variables)
    assert not np.array_equal(before["features/kernel:0"], after["features/kernel:0"])
    assert not np.array_equal(before["features/bias:0"], after["features/bias:0"])

    # The regularizer travelled with the module and is evaluated on the current weights.
    (reg,) = model.losses
    expected = L2 * np.sum(np.square(kernel(layer).numpy()))
    np.testing.assert_allclose(float(reg), expected, rtol=1e-5)

    # ...and it is part of the loss Keras trains on (one batch, so no averaging).
    logits = model.predict(x_test, verbose=0)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y_test, logits)
    reported = model.evaluate(x_test, y_test, batch_size=len(x_test), verbose=0)[0]
    np.testing.assert_allclose(reported, float(ce) + expected, rtol=1e-5)

    first, last = history.history["accuracy"][0], history.history["accuracy"][-1]
    with capsys.disabled():
        print(
            f"\nfine-tuned: held-out accuracy {acc_before:.3f} -> {acc_after:.3f}; "
            f"train accuracy epoch 1 {first:.3f} -> epoch 6 {last:.3f}"
        )
    assert last > first + 0.1
    assert acc_after > 0.85 > acc_before


def test_frozen_module_is_untouched(url: str, digits: tuple[np.ndarray, ...]) -> None:
    x, y, x_test, y_test = digits
    layer = KerasLayer(url)  # trainable=False is the default
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 3
    model = compile_(consumer(layer))
    before = snapshot(layer.module.variables)
    acc_before = accuracy(model, x_test, y_test)
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)

    after = snapshot(layer.module.variables)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    assert model.losses == []
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    assert accuracy(model, x_test, y_test) > acc_before  # the head alone learns


def test_regularization_follows_trainable(published: tuple[Path, bytes]) -> None:
    layer = KerasLayer(published[0])
    model = consumer(layer)
    assert model.losses == []
    layer.trainable = True  # unfreezing later, the usual second stage
    assert len(layer.trainable_weights) == 2
    (reg,) = model.losses
    assert float(reg) == pytest.approx(L2 * np.sum(np.square(kernel(layer).numpy())), rel=1e-5)
    # Its gradient reaches the module's kernel: 2 * L2 * kernel.
    with tf.GradientTape() as tape:
        total = tf.add_n(model.losses)
    (grad,) = tape.gradient(total, [layer.trainable_weights[0]])
    np.testing.assert_allclose(grad.numpy(), 2 * L2 * kernel(layer).numpy(), rtol=1e-5)
    layer.trainable = False
    assert model.losses == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.Adam(1e-3),
        lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        lambda: keras.optimizers.RMSprop(1e-3),
    ],
    ids=["adam", "sgd", "rmsprop"],
)
def test_optimizers_with_slot_variables(
    make: Any, published: tuple[Path, bytes], digits: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = digits
    layer = KerasLayer(published[0], trainable=True)
    model = compile_(consumer(layer), make())
    before = kernel(layer).numpy().copy()
    model.train_on_batch(x[:64], y[:64])
    assert not np.array_equal(before, kernel(layer).numpy())
    # Slot variables are named after the wrapped weights' Keras paths.
    names = [v.path for v in model.optimizer.variables]
    assert any(layer.name + "_features_kernel" in n for n in names), names


def test_eager_gradient_tape(published: tuple[Path, bytes]) -> None:
    layer = KerasLayer(published[0], trainable=True)
    x = tf.ones((4, 64))
    grads = []
    for _ in range(2):  # the second call takes asynchub's cached fast path
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=False))
        grads.append(tape.gradient(loss, layer.trainable_weights))
    assert all(g is not None for g in grads[0])
    np.testing.assert_array_equal(grads[0][0].numpy(), grads[1][0].numpy())


# --- training mode ------------------------------------------------------------------


def test_dropout_only_in_training(published: tuple[Path, bytes]) -> None:
    x = tf.ones((32, 64))
    layer = KerasLayer(published[0], trainable=True)
    assert not np.array_equal(layer(x, training=True), layer(x, training=True))
    np.testing.assert_array_equal(layer(x, training=False), layer(x, training=False))
    np.testing.assert_array_equal(layer(x), layer(x, training=False))
    # Frozen, the module stays in inference mode (as BatchNormalization does).
    frozen = KerasLayer(published[0])
    np.testing.assert_array_equal(frozen(x, training=True), frozen(x, training=False))


def test_training_is_passed_only_when_the_module_takes_it(tmp_path: Path) -> None:
    path = reusable_module(tmp_path / "reusable")  # x @ w, plus 1 in training
    x = np.array([[1.0, 1.0]], dtype="float32")
    layer = KerasLayer(path, trainable=True)
    np.testing.assert_allclose(layer(x, training=True), [[4.0]])
    np.testing.assert_allclose(layer(x, training=False), [[3.0]])
    (reg,) = layer.losses
    assert float(reg) == pytest.approx(2.5)
    assert [w.name for w in layer.weights] == ["w", "step"]

    fruit = fruit_module(tmp_path / "fruit")
    assert takes_training(tf.saved_model.load(str(path)).__call__)
    assert not takes_training(tf.saved_model.load(str(fruit)).__call__)
    np.testing.assert_allclose(KerasLayer(fruit)(np.ones((1, 3), "float32")), [[2.0, 2.0, 2.0]])


def test_arguments_go_to_every_call(tmp_path: Path) -> None:
    class Power(tf.Module):
        @tf.function
        def __call__(self, x: Any, power: int = 1) -> Any:
            return x**power

    module = Power()
    for power in (1, 2):
        module.__call__.get_concrete_function(tf.TensorSpec([None], tf.float32), power=power)
    tf.saved_model.save(module, str(tmp_path / "power"))
    layer = KerasLayer(tmp_path / "power", arguments={"power": 2})
    np.testing.assert_allclose(layer(np.array([3.0], "float32")), [9.0])
    assert layer.get_config()["arguments"] == {"power": 2}
    assert layer.handle == str(tmp_path / "power")


# --- signatures ---------------------------------------------------------------------


def test_signature_with_output_key_and_as_dict(tmp_path: Path) -> None:
    path = fruit_module(tmp_path / "fruit")
    inputs = {"apples": np.array([1.0, 2.0], "float32"), "oranges": np.array([3.0, 4.0], "float32")}
    cats = KerasLayer(path, signature="fruit_to_pet", output_key="cats")
    np.testing.assert_allclose(cats(inputs), [4.0, 6.0])
    both = KerasLayer(path, signature="fruit_to_pet", signature_outputs_as_dict=True)
    out = both(inputs)
    assert sorted(out) == ["cats", "dogs"]
    np.testing.assert_allclose(out["dogs"], [6.0, 16.0])  # apples * oranges * 2
    assert both.compute_output_shape({"apples": (None,), "oranges": (None,)}) == {
        "cats": (None,),
        "dogs": (None,),
    }
    # Without output_key, the output called "default" (as for Module calls).
    default = KerasLayer(path, signature="default")
    np.testing.assert_allclose(default(np.ones((1, 3), "float32")), [6.0])
    # A fixed input via arguments; the layer's own input is the other one.
    fixed = KerasLayer(
        path, signature="fruit_to_pet", output_key="cats", arguments={"oranges": [10.0, 20.0]}
    )
    np.testing.assert_allclose(fixed(np.array([1.0, 2.0], "float32")), [11.0, 22.0])


def test_signature_only_module_is_inference_only(tmp_path: Path) -> None:
    path = signatures_module(tmp_path / "sigs", ["serving_default", "other"])
    layer = KerasLayer(path)  # picks serving_default and its only output
    np.testing.assert_allclose(layer(np.array([1.0], "float32")), [1.0])
    np.testing.assert_allclose(KerasLayer(path, signature="other")(np.array([1.0], "f4")), [2.0])

    with pytest.raises(ModuleError, match="cannot be fine-tuned") as info:
        KerasLayer(path, trainable=True)
    assert info.value.handle == str(path)
    assert "no callable object, only signatures (other, serving_default)" in str(info.value)
    # Even where no signature would be the default, fine-tuning is what is refused.
    ambiguous = signatures_module(tmp_path / "ab", ["a", "b"])
    with pytest.raises(ModuleError, match="cannot be fine-tuned"):
        KerasLayer(ambiguous, trainable=True)
    with pytest.raises(SignatureError, match="pass signature= one of: a, b"):
        KerasLayer(ambiguous)
    # Switching it on later fails on the next call, not silently.
    layer.trainable = True
    with pytest.raises(ModuleError, match="cannot be fine-tuned"):
        layer(np.array([1.0], "float32"))


def test_trainable_through_a_signature_is_refused(tmp_path: Path) -> None:
    path = fruit_module(tmp_path / "fruit")
    with pytest.raises(ModuleError, match="through its signature 'default'"):
        KerasLayer(path, signature="default", trainable=True)


def test_argument_errors(tmp_path: Path) -> None:
    path = fruit_module(tmp_path / "fruit")
    with pytest.raises(ValueError, match="not both"):
        KerasLayer(path, signature="default", output_key="default", signature_outputs_as_dict=True)
    with pytest.raises(ValueError, match="needs a signature"):
        KerasLayer(path, signature_outputs_as_dict=True)
    with pytest.raises(SignatureError, match="no signature 'nope'"):
        KerasLayer(path, signature="nope")
    with pytest.raises(SignatureError, match=r"no output 'nope'.*cats, dogs"):
        KerasLayer(path, signature="fruit_to_pet", output_key="nope")
    with pytest.raises(SignatureError, match="several outputs"):
        KerasLayer(path, signature="fruit_to_pet")


# --- shapes and saving --------------------------------------------------------------


def test_functional_model_shapes(published: tuple[Path, bytes]) -> None:
    layer = KerasLayer(published[0], trainable=True)
    model = consumer(layer)
    assert model.output_shape == (None, 10)
    assert layer.compute_output_shape((None, 64)) == (None, 32)
    assert layer.compute_output_shape((8, 64)) == (8, 32)
    sequential = keras.Sequential([keras.Input((64,)), KerasLayer(published[0])])
    assert sequential.output_shape == (None, 32)


def test_keras_file_round_trip(url: str, tmp_path: Path, digits: tuple[np.ndarray, ...]) -> None:
    x, y, x_test, _ = digits
    layer = KerasLayer(url, trainable=True, name="digits_features")
    model = compile_(consumer(layer))
    model.fit(x[:256], y[:256], epochs=1, verbose=0)  # fine-tuned weights differ from the module's
    model.save(tmp_path / "model.keras")

    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.saving.load_model(tmp_path / "model.keras")
    loaded = keras.saving.load_model(
        tmp_path / "model.keras", safe_mode=False, custom_objects={"KerasLayer": KerasLayer}
    )
    again = loaded.get_layer("digits_features")
    assert isinstance(again, KerasLayer)
    assert again.handle == url
    assert again.get_config() == layer.get_config()
    np.testing.assert_allclose(
        loaded.predict(x_test, verbose=0), model.predict(x_test, verbose=0), rtol=1e-6
    )
    # The weights come from the file: the fine-tuned values, now in the new module's variables.
    np.testing.assert_array_equal(kernel(again).numpy(), kernel(layer).numpy())


def test_config_round_trip(tmp_path: Path) -> None:
    path = fruit_module(tmp_path / "fruit")
    layer = KerasLayer(path, signature="fruit_to_pet", output_key="dogs", tags=["serve"], name="f")
    config = layer.get_config()
    assert config["handle"] == str(path)
    assert config["signature"] == "fruit_to_pet"
    assert config["output_key"] == "dogs"
    assert config["tags"] == ["serve"]
    again = KerasLayer.from_config(config)
    assert again.get_config() == config


# --- pure rules and the public face -------------------------------------------------


@pytest.mark.parametrize(
    ("tf_name", "expected"),
    [
        ("dense/kernel:0", "dense_kernel"),
        ("w:0", "w"),
        ("w", "w"),
        ("a b/c:d:12", "a_b_c_d"),
        (":0", "variable"),
    ],
)
def test_keras_variable_name(tf_name: str, expected: str) -> None:
    assert keras_variable_name(tf_name) == expected


def test_unique_names() -> None:
    assert unique_names(["a", "b", "a", "a", "a_1"]) == ["a", "b", "a_1", "a_2", "a_1_1"]


def test_keras_layer_is_lazy() -> None:
    import asynchub

    if "KerasLayer" not in asynchub.__all__:
        pytest.skip("asynchub/__init__.py does not export KerasLayer yet")
    code = (
        "import sys, asynchub; assert 'keras' not in sys.modules; "
        "cls = asynchub.KerasLayer; assert 'keras' in sys.modules; "
        "from asynchub import KerasLayer; assert KerasLayer is cls; print(cls.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["asynchub._keras"]


def test_the_layer_resolves_with_the_hub_or_hub_options_it_is_given(
    server: Server, tmp_path: Path, published: tuple[Path, bytes]
) -> None:
    import asynchub

    url = server.add("/private/1", body=published[1])
    own = tmp_path / "own-cache"
    layer = KerasLayer(url, cache_dir=own, headers={"X-Api-Key": "k"})
    assert layer.module.path.parent == own
    assert server.gets("/private/1")[-1].get("X-Api-Key") == "k"
    assert "headers" not in layer.get_config() and "X-Api-Key" not in str(layer.get_config())
    other = tmp_path / "hub-cache"
    with asynchub.Hub(cache_dir=other) as hub:
        assert KerasLayer(url, hub=hub).module.path.parent == other
        with pytest.raises(ValueError, match="not both"):
            KerasLayer(url, hub=hub, cache_dir=own)
