"""export(): Keras 3 models and tf.Modules as reusable SavedModels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asynchub._export import _input_names, export
from asynchub.errors import ModuleError

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def make_keras_model() -> Any:
    """4 -> 3 with dropout and kernel/bias regularizers: behaves differently in training."""
    inputs = keras.Input(shape=(4,), name="features")
    x = keras.layers.Dense(
        8, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01), name="hidden"
    )(inputs)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(
        3,
        kernel_regularizer=keras.regularizers.L1(0.02),
        bias_regularizer=keras.regularizers.L2(0.1),
        name="logits",
    )(x)
    model = keras.Model(inputs, outputs)
    # Non-zero biases, so the bias regularizer contributes a non-zero term.
    model.get_layer("logits").bias.assign(np.full((3,), 0.5, dtype="float32"))
    return model


class Scale(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable([[1.0, 2.0], [3.0, 4.0]], name="w")
        self.frozen = tf.Variable(1.5, trainable=False, name="frozen")
        self.regularization_losses = [lambda: 0.1 * tf.reduce_sum(tf.square(self.w))]

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def __call__(self, x: Any) -> Any:
        return tf.matmul(x, self.w) * self.frozen


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    model = make_keras_model()
    path = export(model, tmp_path_factory.mktemp("keras") / "module")
    return model, tf.saved_model.load(str(path)), path


X = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")


def test_keras_call_matches_model(keras_export: tuple[Any, Any, Path]) -> None:
    model, loaded, _ = keras_export
    expected = model(X, training=False).numpy()
    np.testing.assert_allclose(loaded(X, training=False).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(loaded(X).numpy(), expected, rtol=1e-6)


def test_keras_training_argument_enables_dropout(keras_export: tuple[Any, Any, Path]) -> None:
    model, loaded, _ = keras_export
    # Inputs of both signs: with all-ones rows, the 8 random hidden units were all dead
    # (relu of a negative sum) about once in 256 initialisations, and dropout then
    # changed nothing.
    big = np.random.default_rng(1).normal(size=(256, 4)).astype("float32")
    # Dropout is active in training: the outputs differ from inference somewhere.
    assert not np.allclose(loaded(big, training=True).numpy(), model(big, training=False))


def test_keras_signatures_default_and_serving_default(
    keras_export: tuple[Any, Any, Path],
) -> None:
    model, loaded, _ = keras_export
    expected = model(X, training=False).numpy()
    for name in ("default", "serving_default"):
        signature = loaded.signatures[name]
        _, kwargs = signature.structured_input_signature
        assert list(kwargs) == ["features"]
        out = signature(features=tf.constant(X))
        assert list(out) == ["default"]
        np.testing.assert_allclose(out["default"].numpy(), expected, rtol=1e-6)


def test_keras_regularization_losses(keras_export: tuple[Any, Any, Path]) -> None:
    model, loaded, _ = keras_export
    # hidden kernel, logits kernel, logits bias
    assert len(loaded.regularization_losses) == 3
    got = sum(float(fn()) for fn in loaded.regularization_losses)
    expected = sum(float(loss) for loss in model.losses)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got > 0


def test_keras_variables(keras_export: tuple[Any, Any, Path]) -> None:
    model, loaded, path = keras_export
    assert len(loaded.trainable_variables) == len(model.trainable_variables) == 4
    assert len(loaded.variables) == len(model.variables)
    assert {tuple(v.shape) for v in loaded.trainable_variables} == {(4, 8), (8,), (8, 3), (3,)}
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables").is_dir()


def test_keras_dict_inputs_and_outputs(tmp_path: Path) -> None:
    apples = keras.Input((2,), name="apples")
    oranges = keras.Input((2,), name="oranges")
    summed = keras.layers.Add()([apples, oranges])
    model = keras.Model(
        {"apples": apples, "oranges": oranges},
        {"cats": keras.layers.Dense(1)(summed), "dogs": keras.layers.Dense(2)(summed)},
    )
    loaded = tf.saved_model.load(str(export(model, tmp_path / "m")))
    a, o = np.ones((3, 2), "float32"), np.full((3, 2), 2.0, "float32")
    out = loaded.signatures["default"](apples=a, oranges=o)
    assert sorted(out) == ["cats", "dogs"]
    expected = model({"apples": a, "oranges": o})
    np.testing.assert_allclose(out["dogs"].numpy(), expected["dogs"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        loaded({"apples": a, "oranges": o})["cats"].numpy(), expected["cats"].numpy(), rtol=1e-6
    )


def test_keras_subclassed_model(tmp_path: Path) -> None:
    class Tiny(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x: Any) -> Any:
            return self.dense(x)

    model = Tiny()
    model(np.zeros((1, 3), "float32"))
    loaded = tf.saved_model.load(str(export(model, tmp_path / "m")))
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert list(loaded.signatures["serving_default"](inputs=x)) == ["default"]


def test_tf_module(tmp_path: Path) -> None:
    module = Scale()
    loaded = tf.saved_model.load(str(export(module, tmp_path / "m")))
    x = np.array([[1.0, 1.0]], "float32")
    expected = module(x).numpy()
    np.testing.assert_allclose(loaded(x).numpy(), expected)
    for name in ("default", "serving_default"):
        np.testing.assert_allclose(loaded.signatures[name](x=x)["default"].numpy(), expected)
    assert [float(fn()) for fn in loaded.regularization_losses] == pytest.approx([3.0])
    assert len(loaded.variables) == 2
    assert len(loaded.trainable_variables) == 1


def test_extra_and_overriding_signatures(tmp_path: Path) -> None:
    module = Scale()
    double = tf.function(
        lambda x: {"twice": 2.0 * x}, input_signature=[tf.TensorSpec([None], tf.float32)]
    )
    loaded = tf.saved_model.load(
        str(export(module, tmp_path / "m", signatures={"double": double, "default": double}))
    )
    assert sorted(loaded.signatures) == ["default", "double", "serving_default"]
    assert loaded.signatures["default"](x=tf.constant([1.0]))["twice"].numpy().tolist() == [2.0]
    assert "default" in loaded.signatures["serving_default"](x=tf.ones((1, 2)))


def test_module_without_input_signature_is_refused(tmp_path: Path) -> None:
    class Loose(tf.Module):
        @tf.function
        def __call__(self, x: Any) -> Any:
            return x

    with pytest.raises(ModuleError, match="input_signature"):
        export(Loose(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match=r"Keras 3 model or a tf\.Module"):
        export(object(), tmp_path / "m")


def test_existing_target_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ModuleError, match="already exists"):
        export(Scale(), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    class Bad(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(1.0)

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return x * self.w

    # A signature that uses a variable the module does not track: save refuses it.
    orphan = tf.Variable(2.0)
    bogus = tf.function(
        lambda x: {"y": x * orphan}, input_signature=[tf.TensorSpec([], tf.float32)]
    )
    with pytest.raises(ModuleError, match="cannot export"):
        export(Bad(), tmp_path / "m", signatures={"bogus": bogus})
    assert list(tmp_path.iterdir()) == []


def test_input_names() -> None:
    spec = tf.TensorSpec([None], tf.float32)
    assert _input_names(tf.TensorSpec([None], tf.float32, name="x")) == ["x"]
    assert _input_names(spec) == ["inputs"]
    assert _input_names([spec, spec]) == ["inputs_0", "inputs_1"]
    assert _input_names({"b": spec, "a": {"y z": spec}}) == ["a/y_z", "b"]
    named = tf.TensorSpec([None], tf.float32, name="x")
    assert _input_names([named, named]) == ["x", "x_1"]
