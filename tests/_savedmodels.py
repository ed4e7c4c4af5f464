"""Small SavedModels for the tests, written into a directory the caller owns.

Each builder imports TensorFlow when called, so collecting the tests does not need it.
The models are tiny on purpose: building and loading them is most of a test's cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _tf() -> Any:
    import tensorflow as tf

    return tf


def fruit_module(path: Path) -> Path:
    """A ``tf.Module`` that is callable and has two signatures.

    - ``__call__(x: float32[?, 3])`` returns ``x * scale`` (scale is 2);
    - ``default(x: float32[?, 3])`` returns ``{"default": sum(x, axis=1) * scale,
      "extra": x + 1}``;
    - ``fruit_to_pet(apples: float32[?], oranges: float32[?])`` returns
      ``{"cats": apples + oranges, "dogs": apples * oranges * scale}``.
    """
    tf = _tf()

    class Fruit(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return x * self.scale

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def default(self, x: Any) -> Any:
            return {"default": tf.reduce_sum(x, axis=1) * self.scale, "extra": x + 1.0}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.float32, name="apples"),
                tf.TensorSpec([None], tf.float32, name="oranges"),
            ]
        )
        def fruit_to_pet(self, apples: Any, oranges: Any) -> Any:
            return {"cats": apples + oranges, "dogs": apples * oranges * self.scale}

    module = Fruit()
    signatures = {"default": module.default, "fruit_to_pet": module.fruit_to_pet}
    tf.saved_model.save(module, str(path), signatures=signatures)
    return path


def signatures_module(path: Path, names: list[str]) -> Path:
    """A non-callable module whose signature ``names[i]`` maps ``x: float32[?]`` to ``x + i``.

    The single output is called ``output``, so which signature ran shows in the value.
    """
    tf = _tf()
    module = tf.Module()
    signatures = {}
    for offset, name in enumerate(names):

        def add(x: Any, offset: float = float(offset)) -> Any:
            return {"output": x + offset}

        fn = tf.function(add, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        signatures[name] = fn.get_concrete_function()
    tf.saved_model.save(module, str(path), signatures=signatures)
    return path


def reusable_module(path: Path) -> Path:
    """A module in TF Hub's reusable-SavedModel form.

    It has ``variables`` (w and a non-trainable step), ``trainable_variables`` (w),
    ``regularization_losses`` (one: ``0.5 * sum(w**2)`` = 2.5) and a ``__call__``
    on ``float32[?, 2]`` that returns ``x @ w``, plus 1 when ``training=True``.
    """
    tf = _tf()
    root = tf.__internal__.tracking.AutoTrackable()
    w = tf.Variable([[1.0], [2.0]], name="w")
    step = tf.Variable(0, trainable=False, name="step")
    root.w, root.step = w, step
    root.variables = [w, step]
    root.trainable_variables = [w]
    root.regularization_losses = [
        tf.function(lambda: 0.5 * tf.reduce_sum(w * w), input_signature=[])
    ]

    def call(x: Any, training: bool = False) -> Any:
        return tf.matmul(x, w) + (1.0 if training else 0.0)

    root.__call__ = tf.function(call)
    spec = tf.TensorSpec([None, 2], tf.float32)
    for training in (False, True):
        root.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(root, str(path))
    return path


def keras_exported(path: Path) -> Path:
    """A Keras 3 model ``feats: float32[?, 4] -> float32[?, 3]`` written by ``model.export``."""
    model = _keras_model()
    model.export(str(path), verbose=False)
    return path


def keras_saved(path: Path) -> Path:
    """The same Keras 3 model written by ``tf.saved_model.save`` (input named ``inputs``)."""
    model = _keras_model()
    _tf().saved_model.save(model, str(path))
    return path


def _keras_model() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="feats")
    outputs = keras.layers.Dense(3, name="dense")(inputs)
    return keras.Model(inputs, outputs)


def two_tag_module(path: Path) -> Path:
    """A TF1-style SavedModel with a ``{"serve"}`` and a ``{"train"}`` MetaGraph.

    Both have a ``serving_default`` signature ``x: float32[?, 2] -> {"y": float32[?, 1]}``
    over one variable ``w = [[1], [2]]``: ``serve`` computes ``x @ w``, ``train`` ten times that.
    """
    tf = _tf()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 2], name="x")
        w = v1.get_variable("w", initializer=tf.constant([[1.0], [2.0]]))
        y = tf.matmul(x, w)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            serve = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            train = v1.saved_model.predict_signature_def({"x": x}, {"y": y * 10.0})
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map={"serving_default": serve}
            )
            builder.add_meta_graph(["train"], signature_def_map={"serving_default": train})
            builder.save()
    return path
