"""Fine-tune hub modules in Keras 3: :class:`KerasLayer`.

Importing this module imports Keras and TensorFlow; ``asynchub`` reaches it only when
``asynchub.KerasLayer`` is first used.

Why the module's variables are wrapped: Keras 3 optimizers build their slot variables
from each weight's Keras ``path`` (``f"{path}_momentum"``), and a restored
``tf.Variable`` has no path, only a TensorFlow name such as ``dense/kernel:0`` whose
``:`` is not valid in a name scope. Each restored variable is therefore wrapped in a
``keras.Variable`` whose value *is* that ``tf.Variable`` (same object, same resource
handle) and whose name is sanitised. Keras' TensorFlow backend treats the wrapper as a
resource variable (gradients are taken through ``handle``, updates go to ``value``), so
the optimizer trains the module's own variables, and the module's functions, which
captured them at load time, see every update.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._tf import INSTALL_HINT
from ._types import Handle
from .errors import MissingDependencyError, ModuleError, SignatureError

try:
    import keras
    import tensorflow as tf
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "asynchub.KerasLayer needs TensorFlow and Keras 3, but they are not installed "
        f"({exc}). Install them with: {INSTALL_HINT}"
    ) from exc

from ._export import unique_names
from ._module import Module, default_output, default_signature, load_module
from ._sync import Hub, resolve

__all__ = ["KerasLayer"]

_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


# --- pure rules ---------------------------------------------------------------------


def keras_variable_name(tf_name: str) -> str:
    """A Keras variable name for a restored ``tf.Variable`` name.

    ``dense/kernel:0`` becomes ``dense_kernel``: no output index, no ``/`` (Keras
    refuses it in names) and nothing that is invalid in a TensorFlow name scope,
    since optimizers put these names into their slot variables' names.
    """
    base = tf_name.rsplit(":", 1)[0] if re.search(r":\d+$", tf_name) else tf_name
    return _INVALID_NAME_CHARS.sub("_", base).strip("_") or "variable"


def takes_training(function: Any) -> bool:
    """Whether a restored ``tf.function`` accepts a ``training`` argument.

    Looks at the function's parameters (as TensorFlow restored them), then at the
    keyword inputs its traces were made with.
    """
    parameters = getattr(getattr(function, "function_type", None), "parameters", None)
    if parameters is None:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            parameters = {}
    if "training" in parameters:
        return True
    for concrete in getattr(function, "concrete_functions", ()):
        _, kwargs = concrete.structured_input_signature
        if "training" in kwargs:
            return True
    return False


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(d is None or isinstance(d, int) for d in value)


@dataclass(frozen=True)
class _Options:
    """What the layer was asked for; a plain value, so Keras' tracking leaves it alone."""

    handle: str
    signature: str | None
    output_key: str | None
    as_dict: bool
    arguments: dict[str, Any] = field(default_factory=dict)
    tags: list[str] | None = None


# --- the layer ----------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="asynchub")
class KerasLayer(keras.layers.Layer):  # type: ignore[misc]  # Keras is untyped
    """A hub module as a Keras 3 layer (TensorFlow backend), optionally fine-tuned.

    ``handle`` is resolved with asynchub (a local directory or archive, or an
    http(s) URL fetched into the cache) and loaded with ``tags`` and
    ``load_options``. Without ``signature`` the layer calls the module's callable
    object, passing ``training`` when it takes one and ``arguments`` on every call;
    with ``trainable=True`` the module's trainable variables are the layer's trainable
    weights and its ``regularization_losses`` are in ``layer.losses``. With
    ``signature`` (or for a module that only has signatures) the layer applies that
    signature for inference and returns ``output_key``, every output as a dict
    (``signature_outputs_as_dict=True``), or the output ``"default"``/the only one.

    The handle is resolved by ``hub`` (an :class:`asynchub.Hub`) if given, else by a
    hub made with ``cache_dir`` and ``headers`` if either is given, else by the
    default hub (``TFHUB_CACHE_DIR``). Only the handle goes into the layer's
    config: a saved model does not carry credentials.

    Raises :class:`ModuleError` when ``trainable=True`` meets a signature: a signature
    has no training mode, no regularization losses and no list of trainable variables,
    so fine-tuning through it would silently train the wrong thing.
    """

    def __init__(
        self,
        handle: Handle,
        *,
        trainable: bool = False,
        signature: str | None = None,
        output_key: str | None = None,
        signature_outputs_as_dict: bool = False,
        arguments: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        load_options: Any = None,
        hub: Hub | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
        **layer_kwargs: Any,
    ) -> None:
        if keras.backend.backend() != "tensorflow":
            raise MissingDependencyError(
                "asynchub.KerasLayer runs on Keras' TensorFlow backend, but Keras uses "
                f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before "
                "importing keras"
            )
        if not isinstance(handle, (str, os.PathLike)):
            raise TypeError(f"handle must be a str or PathLike, got {type(handle).__name__}")
        text = os.fspath(handle)
        if output_key is not None and signature_outputs_as_dict:
            raise ValueError("pass either output_key or signature_outputs_as_dict=True, not both")
        tag_list = [tags] if isinstance(tags, str) else None if tags is None else list(tags)

        if hub is not None and (cache_dir is not None or headers is not None):
            raise ValueError("pass either hub= or hub options (cache_dir=, headers=), not both")
        if hub is not None:
            path = hub.resolve(handle)
        elif cache_dir is not None or headers is not None:
            with Hub(cache_dir=cache_dir, headers=headers) as own:
                path = own.resolve(handle)
        else:
            path = resolve(handle)
        module = load_module(path, handle=text, tags=tag_list, options=load_options)
        obj = module.obj
        # The restored tf.function behind the object's __call__, when it has one.
        call = obj.__call__ if signature is None and callable(obj) else None
        if call is None and trainable:
            raise _fine_tuning_error(module, signature)
        if call is None:
            signature = signature or default_signature(list(module.signatures), handle=text)
            if signature not in module.signatures:
                raise SignatureError(
                    f"module {text!r} has no signature {signature!r}; it has: "
                    f"{', '.join(sorted(module.signatures)) or 'none'}",
                    handle=text,
                )
            if output_key is None and not signature_outputs_as_dict:
                output_key = default_output(module.signatures[signature].output_names)
                if output_key is None:
                    raise SignatureError(
                        f"signature {signature!r} of module {text!r} has several outputs "
                        f"({', '.join(module.signatures[signature].output_names)}); pass "
                        "output_key= one of them, or signature_outputs_as_dict=True",
                        handle=text,
                    )
            elif output_key is not None:
                names = module.signatures[signature].output_names
                if output_key not in names:
                    raise SignatureError(
                        f"signature {signature!r} of module {text!r} has no output "
                        f"{output_key!r}; it has: {', '.join(names) or 'none'}",
                        handle=text,
                    )
        elif signature_outputs_as_dict:
            raise ValueError(
                "signature_outputs_as_dict=True needs a signature: pass signature=, or "
                "use output_key= to pick from a callable module's dict output"
            )

        losses = module.regularization_losses
        if not all(callable(loss) for loss in losses):
            raise ModuleError(
                f"module {text!r}: regularization_losses must hold functions of no "
                "arguments, each returning a scalar",
                handle=text,
            )

        super().__init__(trainable=trainable, **layer_kwargs)
        self._options = _Options(
            handle=text,
            signature=signature,
            output_key=output_key,
            as_dict=signature_outputs_as_dict,
            arguments=dict(arguments or {}),
            tags=tag_list,
        )
        self._module = module
        self._takes_training = call is not None and takes_training(call)
        self._check_trainable()
        self._track_module_variables(module, call)
        self.built = True

    # -- weights and losses ----------------------------------------------------------

    def _track_module_variables(self, module: Module, call: Any) -> None:
        variables, trainable_ids = _module_variables(module, call)
        names = unique_names(keras_variable_name(v.name) for v in variables)
        # The layer's name scope makes each path "<layer>/<name>", as add_weight would.
        with keras.name_scope(self.name, caller=self):
            for variable, name in zip(variables, names, strict=True):
                try:
                    wrapper = keras.Variable(
                        initializer=variable,  # kept as the storage, not copied
                        dtype=variable.dtype,
                        trainable=id(variable) in trainable_ids,
                        autocast=False,  # the module's dtypes were fixed when it was exported
                        name=name,
                    )
                except ValueError as exc:  # e.g. a variable of unknown shape
                    raise ModuleError(
                        f"module {self._options.handle!r}: variable {variable.name!r} cannot "
                        f"be a Keras weight: {exc}",
                        handle=self._options.handle,
                    ) from exc
                if wrapper.value is not variable:  # pragma: no cover - a Keras change
                    raise ModuleError(
                        f"this Keras version ({keras.__version__}) copies variables it wraps; "
                        "asynchub.KerasLayer cannot train the module's own variables with it",
                        handle=self._options.handle,
                    )
                self._track_variable(wrapper)

    def _get_own_losses(self) -> list[Any]:
        # Keras builds `model.losses` (and so the training loss) from every layer's
        # own losses; evaluating the module's functions here, on each access, gives
        # their value on the current weights, inside the training step's tape.
        losses: list[Any] = super()._get_own_losses()
        if self.trainable and self._options.signature is None:
            losses.extend(loss() for loss in self._module.regularization_losses)
        return losses

    def _check_trainable(self) -> None:
        if self.trainable and self._options.signature is not None:
            raise _fine_tuning_error(self._module, self._options.signature)

    # -- calling -----------------------------------------------------------------------

    def call(self, inputs: Any, training: Any = None) -> Any:
        options = self._options
        if options.signature is not None:
            self._check_trainable()  # `trainable` may have been switched on since
            outputs = self._module(
                self._signature_inputs(inputs), signature=options.signature, as_dict=True
            )
            return outputs if options.as_dict else outputs[options.output_key]
        if not self._takes_training:
            return self._select(self._module(inputs, **options.arguments))
        # As in tensorflow_hub and like BatchNormalization: a frozen module always runs
        # in inference mode, so fine-tuning the head never updates its statistics.
        if not self.trainable or training is None:
            training = False
        if tf.is_tensor(training):
            return tf.cond(
                training,
                lambda: self._call_module(inputs, True),
                lambda: self._call_module(inputs, False),
            )
        return self._call_module(inputs, bool(training))

    def _call_module(self, inputs: Any, training: bool) -> Any:
        return self._select(self._module(inputs, training=training, **self._options.arguments))

    def _select(self, result: Any) -> Any:
        key = self._options.output_key
        if key is None:
            return result
        if not isinstance(result, Mapping) or key not in result:
            found = ", ".join(map(str, result)) if isinstance(result, Mapping) else "no dict"
            raise SignatureError(
                f"module {self._options.handle!r} returned {found}; output_key={key!r} "
                "is not one of its outputs",
                handle=self._options.handle,
            )
        return result[key]

    def _signature_inputs(self, inputs: Any) -> Any:
        """``inputs`` plus ``arguments``, named as the signature's inputs."""
        arguments = self._options.arguments
        if not arguments:
            return inputs
        if isinstance(inputs, Mapping):
            return {**arguments, **inputs}
        info = self._module.signatures[self._options.signature or ""]
        free = [name for name in info.input_names if name not in arguments]
        if len(free) != 1:
            raise SignatureError(
                f"signature {info.name!r} of module {self._options.handle!r} takes "
                f"{', '.join(info.input_names)}; with arguments for "
                f"{', '.join(sorted(arguments))}, pass the rest as a dict",
                handle=self._options.handle,
            )
        return {**arguments, free[0]: inputs}

    # -- shapes --------------------------------------------------------------------------

    def compute_output_spec(self, inputs: Any, training: Any = None) -> Any:
        specs = tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), inputs)
        return tf.nest.map_structure(
            lambda t: keras.KerasTensor(tuple(t.shape.as_list()), dtype=t.dtype.name),
            self._trace(specs),
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        if isinstance(input_shape, Mapping):
            specs: Any = {
                name: tf.TensorSpec(shape, self._input_dtype(name))
                for name, shape in input_shape.items()
            }
        elif _is_shape(input_shape):
            specs = tf.TensorSpec(input_shape, self._input_dtype(None))
        else:
            specs = [tf.TensorSpec(shape, self._input_dtype(None)) for shape in input_shape]
        return tf.nest.map_structure(lambda t: tuple(t.shape.as_list()), self._trace(specs))

    def _trace(self, specs: Any) -> Any:
        """The outputs (symbolic tensors) of an inference call on inputs like ``specs``."""
        # Traced rather than read from the restored traces, so output_key, arguments and
        # signatures are all accounted for exactly as in call().
        function = tf.function(lambda x: self.call(x, training=False), autograph=False)
        return function.get_concrete_function(specs).structured_outputs

    def _input_dtype(self, name: str | None) -> Any:
        """The dtype the module takes for input ``name`` (``None``: the only one)."""
        options = self._options
        if options.signature is not None:
            inputs = {t.name: t.dtype for t in self._module.signatures[options.signature].inputs}
            if name is None and len(inputs) == 1:
                name = next(iter(inputs))
            return inputs.get(name or "", "float32")
        dtypes = set()
        for concrete in getattr(self._module.obj.__call__, "concrete_functions", ()):
            args, _ = concrete.structured_input_signature
            if args and isinstance(args[0], tf.TensorSpec):
                dtypes.add(args[0].dtype.name)
        return dtypes.pop() if len(dtypes) == 1 else "float32"

    # -- configuration -------------------------------------------------------------------

    @property
    def handle(self) -> str:
        """The handle the layer was made from, as given."""
        return self._options.handle

    @property
    def module(self) -> Module:
        """The loaded module; its variables are the layer's weights."""
        return self._module

    def get_config(self) -> dict[str, Any]:
        options = self._options
        config: dict[str, Any] = super().get_config()
        config["handle"] = options.handle
        if options.signature is not None:
            config["signature"] = options.signature
        if options.output_key is not None:
            config["output_key"] = options.output_key
        if options.as_dict:
            config["signature_outputs_as_dict"] = True
        if options.arguments:
            config["arguments"] = dict(options.arguments)
        if options.tags is not None:
            config["tags"] = list(options.tags)
        # load_options describe the loading machine (e.g. an I/O device), not the
        # model, so they are not saved; pass them again when loading if needed.
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasLayer:
        if _in_safe_mode():
            # The same rule Keras applies to its TFSMLayer: a config that names a
            # SavedModel would load and run that graph (which can read and write files)
            # merely by opening a .keras file.
            raise ValueError(
                f"loading asynchub.KerasLayer({config.get('handle')!r}) loads and runs that "
                "module's TensorFlow graph, which Keras' safe mode does not allow. If you "
                "trust the file and the module, pass safe_mode=False to "
                "keras.saving.load_model, or call keras.config.enable_unsafe_deserialization()."
            )
        layer: KerasLayer = super().from_config(config)
        return layer


def _fine_tuning_error(module: Module, signature: str | None) -> ModuleError:
    """Why ``module`` cannot be fine-tuned when it is applied through ``signature``."""
    if not callable(module.obj):
        reason = (
            "it has no callable object, only signatures "
            f"({', '.join(sorted(module.signatures)) or 'none'})"
        )
    else:
        reason = f"it is applied through its signature {signature!r}"
    return ModuleError(
        f"module {module.handle!r} cannot be fine-tuned (trainable=True): {reason}, and a "
        "signature has no training mode, regularization losses or trainable variables. "
        "Use trainable=False, or a reusable SavedModel whose callable object is called "
        "(no signature=; asynchub.export writes one).",
        handle=module.handle,
    )


def _module_variables(module: Module, call: Any) -> tuple[list[Any], set[int]]:
    """The module's variables (trainable ones first) and the ids of the trainable ones.

    A reusable SavedModel lists them as attributes; otherwise they are the variables
    its callable object or signatures capture.
    """
    obj = module.obj
    if hasattr(obj, "variables"):
        variables = list(module.variables)
        trainable = (
            list(module.trainable_variables)
            if hasattr(obj, "trainable_variables")
            else [v for v in variables if v.trainable]
        )
    else:
        functions: list[Any] = list(getattr(call, "concrete_functions", ()))
        if call is None:
            functions = list(getattr(obj, "signatures", {}).values())
        seen: dict[int, Any] = {}
        for function in functions:
            for variable in function.variables:
                seen.setdefault(id(variable), variable)
        variables = list(seen.values())
        trainable = [v for v in variables if v.trainable]
    trainable_ids = {id(v) for v in trainable}
    ordered = trainable + [v for v in variables if id(v) not in trainable_ids]
    # A trainable variable that is missing from `variables` still belongs to the layer.
    return list({id(v): v for v in ordered}.values()), trainable_ids


def _in_safe_mode() -> bool:
    """Whether Keras is deserializing in safe mode (``load_model``'s default)."""
    try:
        from keras.src.saving.serialization_lib import in_safe_mode
    except ImportError:  # pragma: no cover - a Keras layout change: err on the safe side
        return True
    return bool(in_safe_mode())
