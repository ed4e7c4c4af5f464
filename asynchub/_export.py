"""Export Keras 3 models and ``tf.Module`` objects as reusable SavedModels (hub modules).

A reusable SavedModel is what TF Hub consumers rely on after ``tf.saved_model.load``:

- ``obj(x)`` / ``obj(x, training=...)``: the restored ``__call__``;
- ``obj.variables``, ``obj.trainable_variables``;
- ``obj.regularization_losses``: argument-free functions, one per regularized weight;
- ``obj.signatures["serving_default"]`` and ``obj.signatures["default"]``.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ._tf import import_tensorflow
from .errors import ModuleError

__all__ = ["export"]

_DEFAULT_SIGNATURES = ("serving_default", "default")
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-/]")


def _is_keras_model(obj: object) -> bool:
    # Checked by module name first so a tf.Module export never imports Keras.
    if not any(cls.__module__.startswith("keras") for cls in type(obj).__mro__):
        return False
    import keras

    return isinstance(obj, keras.Model)


def _input_names(struct: Any) -> list[str]:
    """Signature input names for the leaves of ``struct``, in ``tf.nest.flatten`` order.

    Leaves inside a dict are named by their key path (``apples``, ``a/b``), others by the
    spec's own name, else ``inputs`` (``inputs_<i>`` for several); names are made valid
    for TF (``[A-Za-z0-9_.\\-/]``) and unique.
    """
    raw: list[str | None] = []

    def visit(x: Any, key: str | None) -> None:
        if isinstance(x, Mapping):
            for k in sorted(x):  # tf.nest flattens dicts in sorted key order
                visit(x[k], f"{key}/{k}" if key else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{key}/{i}" if key else None)
        else:
            raw.append(key or getattr(x, "name", None))

    visit(struct, None)
    cleaned = (_INVALID_NAME_CHARS.sub("_", name) if name else "" for name in raw)
    return unique_names(
        text or ("inputs" if len(raw) == 1 else f"inputs_{i}") for i, text in enumerate(cleaned)
    )


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with ``_1``, ``_2``, ... appended to repeats, in order."""
    used: set[str] = set()
    result = []
    for name in names:
        candidate, n = name, 1
        while candidate in used:
            candidate, n = f"{name}_{n}", n + 1
        used.add(candidate)
        result.append(candidate)
    return result


def _flat_signature(tf: Any, struct: Any) -> list[Any]:
    """The leaves of ``struct`` (TensorSpecs) as named specs for a signature function."""
    leaves = tf.nest.flatten(struct)
    return [
        tf.TensorSpec(spec.shape, spec.dtype, name=name)
        for spec, name in zip(leaves, _input_names(struct), strict=True)
    ]


def _output_dict(tf: Any, outputs: Any, names: list[str] | None) -> dict[str, Any]:
    """Signature outputs: a single tensor is ``default`` (the hub convention for
    ``as_dict=False``), dicts keep their keys, sequences take ``names`` or ``output_<i>``.
    """
    if isinstance(outputs, Mapping):
        return {str(k): v for k, v in outputs.items()}
    flat = tf.nest.flatten(outputs)
    if len(flat) == 1:
        return {"default": flat[0]}
    if names is None or len(names) != len(flat) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(flat))]
    return dict(zip(names, flat, strict=True))


def _keras_input_structure(tf: Any, model: Any) -> Any:
    """The model's input structure (a spec, list or dict) as TensorSpecs."""
    import keras

    struct = getattr(model, "_inputs_struct", None)  # functional models
    if struct is None:
        try:
            inputs = model.inputs  # sequential models built with an Input
        except (AttributeError, ValueError):
            inputs = None
        if inputs and len(inputs) == 1:
            struct = inputs[0]
    if struct is None:
        # Subclassed models: Keras records the shapes of the first call.
        try:
            from keras.src.export.export_utils import get_input_signature

            signature = get_input_signature(model)
        except (ValueError, TypeError, ImportError) as exc:
            raise ModuleError(
                f"cannot tell the inputs of {type(model).__name__}: {exc} "
                "Call the model once before exporting it."
            ) from exc
        if len(signature) != 1:
            raise ModuleError(
                f"{type(model).__name__} takes {len(signature)} positional inputs; "
                "a module takes one (a tensor, a list or a dict of tensors)"
            )
        struct = signature[0]

    def to_spec(x: Any) -> Any:
        return tf.TensorSpec(tuple(x.shape), x.dtype, name=getattr(x, "name", None))

    return keras.tree.map_structure(to_spec, struct)


def _regularization_fn(tf: Any, fn: Callable[[], Any]) -> Any:
    # A closure, not a lambda with default arguments: tf.function would record those
    # defaults as inputs that SavedModel cannot encode.
    wrapped = tf.function(fn, input_signature=[], autograph=False)
    wrapped.get_concrete_function()
    return wrapped


def _keras_regularizer_loss(variable: Any) -> Callable[[], Any]:
    regularizer = variable.regularizer
    return lambda: regularizer(variable)


def _build_keras(tf: Any, model: Any) -> tuple[Any, dict[str, Any]]:
    struct = _keras_input_structure(tf, model)
    flat_specs = _flat_signature(tf, struct)
    output_names = getattr(model, "output_names", None)

    def call_fn(inputs: Any, training: bool = False) -> Any:
        return model(inputs, training=training)

    call = tf.function(call_fn, autograph=False)
    # Both traces are saved, so the restored __call__ takes training=True and False.
    call.get_concrete_function(struct, training=False)
    call.get_concrete_function(struct, training=True)

    def signature_fn(*args: Any) -> dict[str, Any]:
        inputs = tf.nest.pack_sequence_as(struct, list(args))
        return _output_dict(tf, model(inputs, training=False), output_names)

    signature = tf.function(signature_fn, input_signature=flat_specs, autograph=False)

    # Only variables and functions are attached, never the Keras model itself: saving
    # walks every attached object, and Keras layers' own tf.functions do not trace
    # without their call arguments (the same choice as keras.export.ExportArchive).
    root = tf.__internal__.tracking.AutoTrackable()
    root.__call__ = call
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    # The terms of Keras' own `model.losses` (each trainable weight's `regularizer`,
    # e.g. a Dense kernel_regularizer), minus activity losses, which need an input.
    root.regularization_losses = [
        _regularization_fn(tf, _keras_regularizer_loss(v))
        for v in model.trainable_weights
        if getattr(v, "regularizer", None) is not None
    ]
    return root, dict.fromkeys(_DEFAULT_SIGNATURES, signature)


def _build_tf_module(tf: Any, module: Any, extra: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    try:
        call = module.__call__  # a tf.function, bound to the module
    except AttributeError:
        call = None
    if not isinstance(call, tf.types.experimental.PolymorphicFunction):
        raise ModuleError(
            f"{type(module).__name__}.__call__ must be a tf.function; "
            "decorate it with @tf.function(input_signature=[...])"
        )
    signatures: dict[str, Any] = {}
    if call.input_signature is not None:
        args = list(call.input_signature)
        # One positional argument is the common case: name its dict keys directly.
        struct = args[0] if len(args) == 1 else args
        flat_specs = _flat_signature(tf, struct)

        def signature_fn(*flat: Any) -> dict[str, Any]:
            inputs = tf.nest.pack_sequence_as(struct, list(flat))
            outputs = call(inputs) if len(args) == 1 else call(*inputs)
            return _output_dict(tf, outputs, None)

        signature = tf.function(signature_fn, input_signature=flat_specs, autograph=False)
        signatures = dict.fromkeys(_DEFAULT_SIGNATURES, signature)
    elif not all(name in extra for name in _DEFAULT_SIGNATURES):
        raise ModuleError(
            f"{type(module).__name__}.__call__ has no input_signature, so the default "
            "signatures cannot be traced; give it one, or pass signatures= with "
            "'serving_default' and 'default'"
        )

    root = tf.__internal__.tracking.AutoTrackable()
    root.module = module  # keeps the module's other attributes and methods reachable
    root.__call__ = call
    root.variables = list(module.variables)
    root.trainable_variables = list(module.trainable_variables)
    losses = []
    for loss in getattr(module, "regularization_losses", None) or []:
        if not callable(loss):
            raise ModuleError(f"{type(module).__name__}.regularization_losses must hold callables")
        losses.append(_regularization_fn(tf, loss))
    root.regularization_losses = losses
    return root, signatures


def export(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    signatures: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``obj`` (a Keras 3 model or a ``tf.Module``) as a reusable SavedModel at ``path``.

    Input specs come from the Keras model's inputs, or from the ``tf.Module``'s
    ``__call__`` ``input_signature``. ``signatures`` (name -> ``tf.function`` with an
    input signature, or a concrete function) adds signatures or replaces the default
    ones (``serving_default`` and ``default``). The directory appears atomically: it is
    written beside ``path`` and renamed into place; ``path`` must not exist or be empty.
    Raises :class:`ModuleError` when the object cannot be exported and
    :class:`MissingDependencyError` without TensorFlow.
    """
    tf = import_tensorflow()
    dst = Path(path).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModuleError(f"{dst} already exists and is not an empty directory")
    extra = dict(signatures or {})
    try:
        if _is_keras_model(obj):
            if not obj.built:
                raise ModuleError(
                    f"the Keras model {obj.name!r} is not built; call it once or give it inputs"
                )
            root, defaults = _build_keras(tf, obj)
        elif isinstance(obj, tf.Module):
            root, defaults = _build_tf_module(tf, obj, extra)
        else:
            raise ModuleError(
                f"cannot export {type(obj).__name__}: expected a Keras 3 model or a tf.Module"
            )
    except ModuleError:
        raise
    except Exception as exc:  # TF and Keras raise many types while tracing
        raise ModuleError(f"cannot trace {type(obj).__name__} for export: {exc}") from exc

    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tf.saved_model.save(root, str(tmp), signatures={**defaults, **extra})
        # rename() replaces an empty directory and refuses a non-empty one, so a
        # module written meanwhile by someone else is never clobbered.
        os.rename(tmp, dst)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise ModuleError(f"cannot export {type(obj).__name__} to {dst}: {exc}") from exc
        raise
    return dst
