"""Load a SavedModel directory and apply it: :class:`Module` and :func:`load_module`.

A :class:`Module` works out once per signature (lazily, on first use) everything
that does not change between calls: which function to call, the input names and
their order, the dtypes, which output to return. Each call then only checks that
its inputs fit that plan. Inputs that are eager tensors of a dtype and shape seen
before go straight to the concrete function's flat-argument entry point; so do
host values (numpy arrays and scalars, lists, Python numbers), converted once to
the input's dtype, when the tensor they make has a shape seen before. Anything
else takes the general path, which converts and validates the inputs, and whose
first success for a given shape teaches the fast path that shape.

From async code, :meth:`Module.acall` runs a call in a worker thread and
:meth:`Module.batched` joins concurrent requests into one call (``_batching.py``);
their binders here check each request against the same plan ``m(x)`` uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._batching import Batched, Binder, in_thread
from ._tf import gc_paused, host_converter, host_types, import_tensorflow
from .errors import ModuleError, SignatureError

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["Module", "SignatureInfo", "TensorInfo", "load_module"]

#: Distinct input shapes (per input) and call keys (per callable) the fast path
#: remembers; past this, calls still work, through the general path.
_FAST_PATH_LIMIT = 64
#: Distinct (dtype, shape) pairs a batcher's binder remembers as already checked.
_BINDER_LIMIT = 256
_LISTING_LIMIT = 12
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: The order in which a module without a callable object picks its signature.
_DEFAULT_SIGNATURES = ("default", "serving_default")
#: Keyword values that a restored ``tf.function`` bakes into its trace as constants.
_LITERAL_TYPES = frozenset({bool, int, float, str, type(None)})
#: How TensorFlow's messages start when a restored function does not accept its inputs
#: (as opposed to failing inside); only these become SignatureError.
_NO_MATCH = ("Could not find matching concrete function", "Binding inputs to tf.function failed")

_FlatCall = Callable[[list[Any]], Any]
_Plan = Callable[[Any, bool, dict[str, Any]], Any]


# --- what a signature looks like ----------------------------------------------------


@dataclass(frozen=True, repr=False)
class TensorInfo:
    """Name, dtype and shape of one input or output of a signature.

    ``shape`` is ``None`` when even the rank is unknown; unknown dimensions are ``None``.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> TensorInfo:
        """Describe a ``tf.TensorSpec`` (or anything with ``dtype`` and ``shape``)."""
        dtype = getattr(getattr(spec, "dtype", None), "name", "unknown")
        shape = getattr(spec, "shape", None)
        dims = None if shape is None or shape.rank is None else tuple(shape.as_list())
        return cls(name=name, dtype=str(dtype), shape=dims)

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{_format_shape(self.shape)}"

    def __repr__(self) -> str:
        return f"<TensorInfo {self}>"


@dataclass(frozen=True, repr=False)
class SignatureInfo:
    """The inputs and outputs of one signature, each sorted by name."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @classmethod
    def from_function(cls, name: str, fn: Any) -> SignatureInfo:
        """Describe a signature's concrete function (its keyword inputs and dict outputs)."""
        _, input_specs = fn.structured_input_signature
        outputs = fn.structured_outputs
        output_specs = outputs if isinstance(outputs, Mapping) else {}
        return cls(
            name=name,
            inputs=tuple(TensorInfo.from_spec(n, input_specs[n]) for n in sorted(input_specs)),
            outputs=tuple(TensorInfo.from_spec(n, output_specs[n]) for n in sorted(output_specs)),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def __str__(self) -> str:
        inputs = ", ".join(map(str, self.inputs))
        outputs = ", ".join(map(str, self.outputs))
        return f"{self.name}({inputs}) -> {{{outputs}}}"

    def __repr__(self) -> str:
        return f"<SignatureInfo {self}>"


class _SignatureMap(Mapping[str, SignatureInfo]):
    """A read-only mapping of signature name to :class:`SignatureInfo`."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, SignatureInfo]) -> None:
        self._items = dict(items)

    def __getitem__(self, name: str) -> SignatureInfo:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __str__(self) -> str:
        return "\n".join(map(str, self._items.values())) or "(no signatures)"

    def __repr__(self) -> str:
        return f"<signatures: {'; '.join(map(str, self._items.values()))}>"


def _format_shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "[...]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --- pure rules -----------------------------------------------------------------------


def default_signature(names: Sequence[str], *, handle: str) -> str:
    """The signature a call without ``signature=`` uses when the module is not callable.

    ``"default"``, else ``"serving_default"``, else the only one; otherwise
    :class:`SignatureError` listing what exists.
    """
    for name in _DEFAULT_SIGNATURES:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    if not names:
        raise SignatureError(
            f"module {handle!r} is not callable and has no signatures: there is nothing to call",
            handle=handle,
        )
    raise SignatureError(
        f"module {handle!r} is not callable and has no 'default' or 'serving_default' "
        f"signature; pass signature= one of: {', '.join(sorted(names))}",
        handle=handle,
    )


def default_output(names: Sequence[str]) -> str | None:
    """The output a call with ``as_dict=False`` returns: ``"default"``, else the only one.

    ``None`` when that is ambiguous (several outputs, none called ``"default"``).
    """
    if "default" in names:
        return "default"
    return names[0] if len(names) == 1 else None


# --- the call plans -------------------------------------------------------------------


def _eager_tensor_type(tf: Any) -> Any:
    """The eager tensor class if it offers what the fast path relies on, else ``None``."""
    eager = getattr(getattr(tf, "__internal__", None), "EagerTensor", None)
    if isinstance(eager, type) and hasattr(eager, "_shape_tuple"):
        return eager
    return None


def _flat_caller(fn: Any) -> _FlatCall | None:
    """``fn``'s flat-argument entry point with its captures bound, or ``None``.

    This is the private ``ConcreteFunction._call_flat`` that TensorFlow's own
    keyword call ends in; skipping the keyword binding in front of it is where
    the time goes. Any sign that the private API changed turns the fast path off.
    """
    call_flat = getattr(fn, "_call_flat", None)
    raw_captures = getattr(fn, "_captured_inputs", None)
    if not callable(call_flat) or not isinstance(raw_captures, (list, tuple)):
        return None
    if any(callable(c) for c in raw_captures):
        # Deferred captures are resolved anew on every call; so must we.
        return lambda args: call_flat(args, fn.captured_inputs)
    # Variables are captured by handle: the list stays valid as values change.
    captured = list(fn.captured_inputs)
    return lambda args: call_flat(args, captured)


def _flat_order(fn: Any, tensors: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The input names in the order ``fn``'s flat entry point takes them.

    Asks TensorFlow's own binding (the one the keyword call uses) where each of
    ``tensors`` lands, and trusts the answer only if every tensor lands exactly once.
    """
    try:
        function_type = fn.function_type
        bound = function_type.bind_with_defaults((), dict(tensors), {})
        flat = function_type.unpack_inputs(bound)
    except Exception:  # a private-API probe: any failure only disables the fast path
        return None
    names_by_id = {id(t): name for name, t in tensors.items()}
    order = tuple(names_by_id.get(id(t)) for t in flat)
    if len(order) != len(tensors) or len(set(order)) != len(order) or None in order:
        return None
    return order  # type: ignore[return-value]  # None was ruled out just above


def _as_dict(result: Any) -> dict[str, Any]:
    # A callable object returns what it returns; as_dict names a lone result "default",
    # the same key a signature's single output conventionally has.
    return dict(result) if isinstance(result, Mapping) else {"default": result}


class _SignaturePlan:
    """How to call one signature; built on its first use and kept on the Module."""

    def __init__(self, tf: Any, fn: Any, info: SignatureInfo, handle: str) -> None:
        self._tf = tf
        self._fn = fn
        self._info = info
        self._handle = handle
        self._where = f"signature {info.name!r} of module {handle!r}"
        self._specs: dict[str, Any] = dict(fn.structured_input_signature[1])
        self._names = info.input_names
        self._output = default_output(info.output_names)
        self._eager = _eager_tensor_type(tf)
        self._host = host_types()
        self._to_tensor = host_converter(tf)
        dense = all(isinstance(s, tf.TensorSpec) for s in self._specs.values())
        self._flat = _flat_caller(fn) if dense and self._eager is not None else None
        self._order: tuple[str, ...] | None = None
        # (name, dtype, shapes seen to fit) in flat order; empty until the first
        # general call has established the order.
        self._fast: tuple[tuple[str, Any, set[tuple[int, ...]]], ...] = ()

    def __call__(self, inputs: Any, as_dict: bool, kwargs: dict[str, Any]) -> Any:
        output = self._output
        if output is None and not as_dict:
            self._bind(inputs, kwargs)  # a mistake in the inputs is the more useful error
            raise self._ambiguous_output()
        fast, flat_call, eager = self._fast, self._flat, self._eager
        if fast and flat_call is not None and not kwargs:
            kind = type(inputs)
            if kind is eager:
                if len(fast) == 1:
                    _, dtype, seen = fast[0]
                    if inputs.dtype is dtype and inputs._shape_tuple() in seen:
                        result = flat_call([inputs])
                        return result if as_dict else result[output]
            elif kind in self._host:
                if len(fast) == 1:
                    _, dtype, seen = fast[0]
                    tensor = self._host_tensor(inputs, dtype)
                    if tensor is not None:
                        if tensor._shape_tuple() in seen:
                            result = flat_call([tensor])
                            return result if as_dict else result[output]
                        # The general path would convert it the same way: once is enough.
                        inputs = tensor
            elif kind is dict and len(inputs) == len(fast):
                args = []
                for name, dtype, seen in fast:
                    value: Any = inputs.get(name)
                    if type(value) is not eager:
                        if type(value) not in self._host:
                            break
                        value = self._host_tensor(value, dtype)
                        if value is None:
                            break
                    if value.dtype is not dtype or value._shape_tuple() not in seen:
                        break
                    args.append(value)
                else:
                    result = flat_call(args)
                    return result if as_dict else result[output]
        result = self._call_general(inputs, kwargs)
        return result if as_dict else result[output]

    def _host_tensor(self, value: Any, dtype: Any) -> Any:
        """``value`` (a host value) as an eager tensor of ``dtype``, or ``None`` if the
        general path must decide (not executing eagerly, or the conversion fails: the
        general path converts again and raises the error a user should see)."""
        try:
            return self._to_tensor(value, dtype)
        except Exception:  # the general path raises the SignatureError for it
            return None

    def _call_general(self, inputs: Any, kwargs: dict[str, Any]) -> Any:
        tensors = self._bind(inputs, kwargs)
        flat_call, eager = self._flat, self._eager
        if flat_call is not None and all(type(t) is eager for t in tensors.values()):
            order = self._order
            if order is None:
                order = _flat_order(self._fn, tensors)
                if order is None:
                    self._flat = None
                    return self._fn(**tensors)
                # _fast first: another thread that sees _order set must also see _fast.
                self._fast = tuple((name, tensors[name].dtype, set()) for name in order)
                self._order = order
            args = [tensors[name] for name in order]
            result = flat_call(args)
            # _bind checked these shapes against the spec, so the fast path may trust them.
            for (_, _, seen), arg in zip(self._fast, args, strict=True):
                if len(seen) < _FAST_PATH_LIMIT:
                    seen.add(arg._shape_tuple())
            return result
        # Symbolic tensors (inside a tf.function) and composite inputs take the
        # structured call, exactly as TensorFlow would.
        return self._fn(**tensors)

    def _bind(self, inputs: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map ``inputs`` to the signature's input names, as tensors of the right dtype."""
        given = self._given(inputs, kwargs)
        return {name: self._convert(name, value) for name, value in given.items()}

    def _given(self, inputs: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map ``inputs`` to the signature's input names, as they are."""
        if kwargs:
            raise SignatureError(
                f"{self._where} takes no keyword arguments, got: {', '.join(sorted(kwargs))}; "
                "keyword arguments such as training= go to the module's callable object "
                "(call it without signature=)",
                handle=self._handle,
            )
        if isinstance(inputs, Mapping):
            given = dict(inputs)
            missing = [n for n in self._names if n not in given]
            unknown = sorted(str(k) for k in given if k not in self._specs)
            if missing or unknown:
                problems = []
                if missing:
                    problems.append(f"missing input(s) {', '.join(map(repr, missing))}")
                if unknown:
                    problems.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
                raise SignatureError(
                    f"{self._where}: {' and '.join(problems)}; it takes: {self._expected()}",
                    handle=self._handle,
                )
        elif len(self._names) == 1:
            given = {self._names[0]: inputs}
        else:
            raise SignatureError(
                f"{self._where} takes {len(self._names)} inputs ({self._expected()}); "
                "pass a dict that maps each input name to its value",
                handle=self._handle,
            )
        return given

    def _convert(self, name: str, value: Any) -> Any:
        tf, spec = self._tf, self._specs[name]
        if not isinstance(spec, tf.TensorSpec):
            return value  # composite inputs (ragged, sparse) go to TensorFlow as given
        if isinstance(value, (tf.Tensor, tf.Variable)):
            if value.dtype != spec.dtype:
                raise SignatureError(
                    f"{self._where}: input {name!r} must be {spec.dtype.name}, got a "
                    f"{value.dtype.name} tensor; convert it with tf.cast(x, tf.{spec.dtype.name})",
                    handle=self._handle,
                )
            tensor = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
        else:
            try:
                tensor = tf.convert_to_tensor(value, dtype=spec.dtype)
            except (TypeError, ValueError) as exc:
                raise SignatureError(
                    f"{self._where}: input {name!r} cannot be converted to "
                    f"{spec.dtype.name}: {exc}",
                    handle=self._handle,
                ) from exc
        if not spec.shape.is_compatible_with(tensor.shape):
            raise self._wrong_shape(name, _dims(tensor.shape))
        return tensor

    def _wrong_shape(self, name: str, dims: tuple[int | None, ...] | None) -> SignatureError:
        return SignatureError(
            f"{self._where}: input {name!r} must have shape "
            f"{_format_shape(_dims(self._specs[name].shape))}, got {_format_shape(dims)}",
            handle=self._handle,
        )

    def _expected(self) -> str:
        return ", ".join(map(str, self._info.inputs)) or "no inputs"

    def _ambiguous_output(self) -> SignatureError:
        outputs = ", ".join(self._info.output_names) or "none"
        return SignatureError(
            f"{self._where} has no single output to return (outputs: {outputs}; none is "
            "named 'default'); pass as_dict=True to get every output by name",
            handle=self._handle,
        )


def _dims(shape: Any) -> tuple[int | None, ...] | None:
    return None if shape.rank is None else tuple(shape.as_list())


class _CallablePlan:
    """How to call the loaded object itself (its restored ``__call__``)."""

    def __init__(self, tf: Any, obj: Any, handle: str) -> None:
        self._tf = tf
        self._obj = obj
        self._handle = handle
        self._eager = _eager_tensor_type(tf)
        self._host = host_types()
        self._to_tensor = host_converter(tf)
        function = getattr(obj, "__call__", None)  # noqa: B004 - we want the restored tf.function
        usable = (
            self._eager is not None
            and hasattr(function, "get_concrete_function")
            # XLA-compiled functions run under a context the flat call would skip.
            and not getattr(function, "_jit_compile", False)
        )
        self._function = function if usable else None
        self._concrete = tuple(getattr(function, "concrete_functions", ()))
        self._dtype = self._common_input_dtype()
        self._cache: dict[Hashable, _FlatCall | None] = {}
        # What every restored trace takes first, if each takes a dense tensor: a
        # tensor that fits none of them is refused before TensorFlow sees it.
        firsts = [concrete.structured_input_signature[0][:1] for concrete in self._concrete]
        dense = bool(firsts) and all(
            len(first) == 1 and isinstance(first[0], tf.TensorSpec) for first in firsts
        )
        self._first_specs: tuple[Any, ...] = tuple(f[0] for f in firsts) if dense else ()
        self._lock = _function_lock(function)

    def __call__(self, inputs: Any, as_dict: bool, kwargs: dict[str, Any]) -> Any:
        if self._dtype is not None and type(inputs) in self._host:
            # The general path would convert it to this dtype too: once is enough, and
            # the tensor may then take the flat call below.
            try:
                tensor = self._to_tensor(inputs, self._dtype)
            except Exception:  # the general path raises the SignatureError for it
                tensor = None
            if tensor is not None:
                inputs = tensor
        if type(inputs) is self._eager:
            key = (
                (inputs.dtype, inputs._shape_tuple(), ())
                if not kwargs
                else _call_key(inputs, kwargs)
            )
            call = self._cache.get(key)
            if call is not None:
                result = call([inputs])
                return _as_dict(result) if as_dict else result
        result = self._call_general(inputs, kwargs)
        return _as_dict(result) if as_dict else result

    def _call_general(self, inputs: Any, kwargs: dict[str, Any]) -> Any:
        tf = self._tf
        value = inputs
        if (
            self._dtype is not None
            and not isinstance(inputs, (Mapping, tf.Variable))
            and not tf.is_tensor(inputs)
        ):
            try:
                value = tf.convert_to_tensor(inputs, dtype=self._dtype)
            except (TypeError, ValueError) as exc:
                raise SignatureError(
                    f"module {self._handle!r}: the input cannot be converted to "
                    f"{self._dtype.name}, the dtype its callable object takes: {exc}",
                    handle=self._handle,
                ) from exc
        if self._first_specs and isinstance(value, tf.Tensor):
            self._check(value)
        lock = self._lock
        held = lock is not None and lock._is_owned()
        try:
            result = self._obj(value, **kwargs)
        except (TypeError, ValueError) as exc:
            if lock is not None and not held:
                _release_leaked(lock)
            if not str(exc).startswith(_NO_MATCH):
                raise  # an error inside the model, not in how it was called
            raise SignatureError(
                f"module {self._handle!r}: its callable object does not accept these "
                f"inputs; it accepts {self._accepted()} (or pass signature=). "
                f"TensorFlow said: {exc}",
                handle=self._handle,
            ) from exc
        if self._function is not None and type(value) is self._eager:
            key = _call_key(value, kwargs)
            if key is not None and key not in self._cache and len(self._cache) < _FAST_PATH_LIMIT:
                # None is remembered too, so a call that cannot be bound is not retried.
                self._cache[key] = self._bind(value, kwargs)
        return result

    def _check(self, value: Any) -> None:
        """Refuse a tensor that no restored trace takes: TensorFlow must not see it.

        TensorFlow 2.21's ``Function._call`` keeps its lock when it cannot bind its
        inputs, and every later call from another thread then waits for it forever.
        """
        dtype, shape = value.dtype, value.shape
        for spec in self._first_specs:
            if spec.dtype == dtype and spec.shape.is_compatible_with(shape):
                return
        raise SignatureError(
            f"module {self._handle!r}: its callable object does not accept a "
            f"{dtype.name}{_format_shape(_dims(shape))} tensor; it accepts "
            f"{self._accepted()} (or pass signature=)",
            handle=self._handle,
        )

    def _bind(self, value: Any, kwargs: dict[str, Any]) -> _FlatCall | None:
        """The flat call of the concrete function TensorFlow dispatches ``value`` to."""
        if self._function is None:
            return None
        # Asked for value's exact shape, TensorFlow traces a new function around the
        # restored one for each new shape: ~20 ms for a small MLP, ~1 s for MobileNetV2,
        # at every new batch size. Asked for the restored trace's own spec (or value's
        # with the batch dimension left open), it traces once for all batch sizes.
        spec = self._spec_for(value)
        try:
            concrete = self._function.get_concrete_function(spec, **kwargs)
        except Exception:  # an optimisation only: the general path stays correct
            return None
        # One tensor goes in and the rest are literals baked into the trace, so the
        # function's only non-captured input must be that tensor.
        if len(concrete.inputs) - len(concrete.captured_inputs) != 1:
            return None
        return _flat_caller(concrete)

    def _spec_for(self, value: Any) -> Any:
        """The most general spec that dispatches like ``value`` (an eager tensor)."""
        tf = self._tf
        fitting = set()
        for concrete in self._concrete:
            args, _ = concrete.structured_input_signature
            spec = args[0] if args else None
            if (
                isinstance(spec, tf.TensorSpec)
                and spec.dtype == value.dtype
                and spec.shape.is_compatible_with(value.shape)
            ):
                fitting.add((spec.dtype, tuple(spec.shape.as_list()) if spec.shape.rank else None))
        if len(fitting) == 1:
            dtype, dims = fitting.pop()
            if dims is not None:
                return tf.TensorSpec(dims, dtype)
        dims = value._shape_tuple()
        if not dims:
            return value
        return tf.TensorSpec([None, *dims[1:]], value.dtype)

    def _common_input_dtype(self) -> Any:
        """The dtype every restored trace takes as its first argument, if they agree."""
        dtypes = set()
        for concrete in self._concrete:
            args, _ = concrete.structured_input_signature
            if not args or not isinstance(args[0], self._tf.TensorSpec):
                return None
            dtypes.add(args[0].dtype)
        return dtypes.pop() if len(dtypes) == 1 else None

    def _accepted(self) -> str:
        forms = []
        for concrete in self._concrete:
            args, kwargs = concrete.structured_input_signature
            parts = [_describe_arg(a) for a in args]
            parts += [f"{k}={_describe_arg(v)}" for k, v in kwargs.items()]
            forms.append(f"({', '.join(parts)})")
        return "; ".join(forms) or "(unknown)"


def _function_lock(function: Any) -> Any:
    """The lock of a ``tf.function``, if it is the reentrant kind that knows its owner."""
    lock = getattr(function, "_lock", None)
    owned = getattr(lock, "_is_owned", None)
    return lock if callable(owned) and callable(getattr(lock, "release", None)) else None


def _release_leaked(lock: Any) -> None:
    """Release ``lock`` if a failed call left it held by this thread.

    TensorFlow 2.21's ``Function._call`` keeps its lock when binding the inputs fails
    (those :meth:`_CallablePlan._check` cannot see: keyword arguments, structures);
    the caller held it not before the call, so no frame of ours still needs it.
    """
    try:
        while lock._is_owned():
            lock.release()
    except RuntimeError:  # not held after all
        pass


def _describe_arg(arg: Any) -> str:
    if hasattr(arg, "dtype") and hasattr(arg, "shape"):
        return f"{arg.dtype.name}{_format_shape(_dims(arg.shape))}"
    return repr(arg)


def _call_key(inputs: Any, kwargs: dict[str, Any]) -> Hashable | None:
    """What TensorFlow dispatches a one-tensor call on, or ``None`` if not cacheable."""
    items = []
    for name, value in kwargs.items():
        if type(value) not in _LITERAL_TYPES:
            return None
        # The type is part of the key: True == 1, yet they are different traces.
        items.append((name, type(value).__name__, value))
    return (inputs.dtype, inputs._shape_tuple(), tuple(sorted(items)))


# --- binding one request of a batcher -------------------------------------------------

#: numpy dtype kinds whose arrays a binder takes as they are: bool, ints, floats,
#: complex. Converting one to an input of such a dtype is numpy's cast, which
#: cannot fail, so the conversion may wait for the worker thread.
_NUMERIC_KINDS = "biufc"


def _require_batch_dimension(where: str, name: str, spec: Any, handle: str) -> None:
    """Raise :class:`SignatureError` unless ``spec`` can be joined with others along axis 0."""
    dims = _dims(spec.shape)
    if dims is None or not dims or dims[0] is not None:
        raise SignatureError(
            f"{where} cannot be batched: {name} has shape {_format_shape(dims)}, with no "
            "leading batch dimension of any size ([?, ...]), and every input and output "
            "needs one; call m.acall(...) per request",
            handle=handle,
        )


def _require_batch_outputs(tf: Any, where: str, outputs: Any, handle: str) -> None:
    """Raise :class:`SignatureError` unless every leaf of ``outputs`` (a function's
    structured outputs) is a dense tensor with a leading batch dimension.

    Only such an output can be split back per request. Decided from the spec, never
    from a result's shape: a constant table of 4 values is not 4 rows.
    """
    if isinstance(outputs, Mapping):
        items = [(f"output {name!r}", value) for name, value in outputs.items()]
    else:
        items = [("its output", outputs)]
    for label, value in items:
        leaves = tf.nest.flatten(value)
        for i, leaf in enumerate(leaves):
            name = label if len(leaves) == 1 else f"{label} (part {i})"
            if not isinstance(leaf, (tf.TensorSpec, tf.Tensor)):
                raise SignatureError(
                    f"{where} cannot be batched: {name} is a {type(leaf).__name__}, and "
                    "only dense tensors are split between requests; call m.acall(...) "
                    "per request",
                    handle=handle,
                )
            _require_batch_dimension(where, name, leaf, handle)


def _fits(dims: tuple[int, ...], spec: tuple[int | None, ...]) -> bool:
    """Whether an array of shape ``dims`` fits a spec's known-rank ``spec`` dims."""
    return len(dims) == len(spec) and all(
        want is None or want == dim for dim, want in zip(dims, spec, strict=True)
    )


class _HostArrays:
    """The numpy arrays a binder takes as they are, and the ones it has seen bind.

    Numeric arrays, for an input of a numeric dtype: they are checked by dtype and
    shape alone, on the loop, and converted in the worker thread by the call, as
    ``m(x)`` converts them (a big request must not stall the loop while it is
    copied or cast). An array of the input's own dtype joins tensors; one of
    another dtype joins only arrays of that same dtype, so that a batch of them is
    cast once, as each would be. ``seen`` maps ``(dtype, shape)`` to the key.
    """

    __slots__ = ("dtype", "kind", "seen")

    def __init__(self, dtype: Any) -> None:
        import numpy as np

        numpy_dtype = getattr(dtype, "as_numpy_dtype", None)
        usable = numpy_dtype is not None and np.dtype(numpy_dtype).kind in _NUMERIC_KINDS
        #: ``np.ndarray``, or ``None`` when the input's dtype is not numeric.
        self.kind: type | None = np.ndarray if usable else None
        self.dtype = np.dtype(numpy_dtype) if usable else None
        self.seen: dict[tuple[Any, tuple[int, ...]], Hashable] = {}

    def takes(self, value: Any) -> bool:
        """Whether ``value`` is an array to pass on as it is."""
        if type(value) is not self.kind:
            return False
        array: Any = value
        return array.dtype.kind in _NUMERIC_KINDS

    def join_dtype(self, array: Any, own: Any) -> Any:
        """What ``array`` joins by: ``own`` (the input's tf dtype) if it is of the input's
        dtype, else its numpy dtype."""
        return own if array.dtype == self.dtype else array.dtype

    def remember(self, array: Any, key: Hashable) -> None:
        if len(self.seen) < _BINDER_LIMIT:
            self.seen[(array.dtype, array.shape)] = key


class _SignatureBinder:
    """Binds one request of ``m.batched(signature=...)``: checks it, finds its group.

    The checks are the plan's own, so a request fails exactly as ``m(x)`` would;
    inputs seen to pass once (an eager tensor or a numpy array of a known dtype and
    shape) skip them. A numeric numpy array is passed on as it is (see
    :class:`_HostArrays`), so that a batch of them is joined with numpy and
    converted once, by the call, in the worker thread.
    """

    def __init__(self, plan: _SignaturePlan) -> None:
        tf = plan._tf
        for name in plan._names:
            spec = plan._specs[name]
            if not isinstance(spec, tf.TensorSpec):
                raise SignatureError(
                    f"{plan._where} cannot be batched: input {name!r} is a "
                    f"{type(spec).__name__}, and only dense tensors are joined; "
                    "call m.acall(...) per request",
                    handle=plan._handle,
                )
            _require_batch_dimension(plan._where, f"input {name!r}", spec, plan._handle)
        self._plan = plan
        self._names = plan._names
        self._single = len(plan._names) == 1
        self._eager = plan._eager
        self._seen: dict[tuple[Any, tuple[int, ...]], Hashable] = {}
        # Per input: its dtype, its spec's dims, and how its arrays are taken.
        self._inputs = {
            name: (spec.dtype, _dims(spec.shape), _HostArrays(spec.dtype))
            for name, spec in plan._specs.items()
        }
        self._host = self._inputs[plan._names[0]][2]

    def __call__(self, inputs: Any) -> tuple[Hashable | None, int, Any]:
        if self._single:
            kind = type(inputs)
            if kind is self._eager:
                shape = inputs._shape_tuple()
                key = self._seen.get((inputs.dtype, shape))
                if key is not None:
                    return key, shape[0], inputs
            elif kind is self._host.kind:
                shape = inputs.shape
                key = self._host.seen.get((inputs.dtype, shape))
                if key is not None:
                    return key, shape[0], inputs
        plan = self._plan
        given = plan._given(inputs, {})
        values: dict[str, Any] = {}
        parts: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for name, value in given.items():
            dtype, spec, host = self._inputs[name]
            if host.takes(value):
                dims = value.shape
                if not _fits(dims, spec):  # type: ignore[arg-type]  # a batch dim: known rank
                    raise plan._wrong_shape(name, dims)
                values[name] = value
                parts[name] = (host.join_dtype(value, dtype), dims)
            else:
                tensor = values[name] = plan._convert(name, value)
                parts[name] = (tensor.dtype, tuple(tensor.shape.as_list()))
        rows = {dims[0] for _, dims in parts.values()}
        first = values[self._names[0]]
        payload = first if self._single else values
        if len(rows) != 1:  # the inputs disagree on the number of rows: no joining
            return None, max(rows), payload
        key = tuple((parts[name][0], parts[name][1][1:]) for name in self._names)
        if self._single:
            if type(first) is self._eager:
                if len(self._seen) < _BINDER_LIMIT:
                    self._seen[(first.dtype, parts[self._names[0]][1])] = key
            elif type(first) is self._host.kind:
                self._host.remember(first, key)
        return key, rows.pop(), payload


class _CallableBinder:
    """Binds one request of ``m.batched()`` on a callable object: one tensor, checked
    against the input forms the object was traced for; a numeric numpy array is
    checked by dtype and shape and passed on as it is (see :class:`_HostArrays`)."""

    def __init__(self, plan: _CallablePlan) -> None:
        tf = plan._tf
        where = f"the callable object of module {plan._handle!r}"
        specs = []
        for concrete in plan._concrete:
            args, _ = concrete.structured_input_signature
            spec = args[0] if args else None
            if not isinstance(spec, tf.TensorSpec):
                raise SignatureError(
                    f"{where} cannot be batched: it takes {plan._accepted()}, not a single "
                    "tensor first; pass signature= to batch one of its signatures",
                    handle=plan._handle,
                )
            _require_batch_dimension(where, "its input", spec, plan._handle)
            specs.append(spec)
        if not specs:
            raise SignatureError(
                f"{where} cannot be batched: it has no traced input forms to check "
                "requests against; pass signature=",
                handle=plan._handle,
            )
        for concrete in plan._concrete:
            _require_batch_outputs(tf, where, concrete.structured_outputs, plan._handle)
        self._plan = plan
        self._tf = tf
        self._specs = tuple(specs)
        self._forms = tuple((spec.dtype, _dims(spec.shape)) for spec in specs)
        self._eager = plan._eager
        self._seen: dict[tuple[Any, tuple[int, ...]], Hashable] = {}
        # Without one dtype that every trace takes, an array is taken at its own dtype
        # (as converting it would give), and the call converts it (``natural``).
        self.natural = plan._dtype is None
        self._host = _HostArrays(plan._dtype)
        if self.natural:
            import numpy as np

            self._host.kind = np.ndarray

    def __call__(self, inputs: Any) -> tuple[Hashable | None, int, Any]:
        kind = type(inputs)
        if kind is self._eager:
            shape = inputs._shape_tuple()
            key = self._seen.get((inputs.dtype, shape))
            if key is not None:
                return key, shape[0], inputs
        elif kind is self._host.kind:
            shape = inputs.shape
            key = self._host.seen.get((inputs.dtype, shape))
            if key is not None:
                return key, shape[0], inputs
            if self._host.takes(inputs):
                return self._bind_array(inputs)
        tf, plan = self._tf, self._plan
        if isinstance(inputs, tf.Tensor):
            tensor = inputs
        elif isinstance(inputs, tf.Variable):
            tensor = tf.convert_to_tensor(inputs)
        else:
            try:
                tensor = tf.convert_to_tensor(inputs, dtype=plan._dtype)
            except (TypeError, ValueError) as exc:
                dtype = (
                    f"to {plan._dtype.name}, the dtype it takes"
                    if plan._dtype is not None
                    else "to a tensor"
                )
                raise SignatureError(
                    f"module {plan._handle!r}: the input cannot be converted {dtype}: {exc}",
                    handle=plan._handle,
                ) from exc
        dims = tensor.shape
        if not any(
            s.dtype == tensor.dtype and s.shape.is_compatible_with(dims) for s in self._specs
        ):
            raise self._refused(tensor.dtype, _dims(dims))
        shape = tuple(dims.as_list())
        key = (tensor.dtype, shape[1:])
        if type(tensor) is self._eager and len(self._seen) < _BINDER_LIMIT:
            self._seen[(tensor.dtype, shape)] = key
        return key, shape[0], tensor

    def _bind_array(self, array: Any) -> tuple[Hashable | None, int, Any]:
        """Check a numeric array by its dtype and shape; it stays an array."""
        plan, dims = self._plan, array.shape
        if self.natural:
            try:
                dtype = self._tf.as_dtype(array.dtype)
            except TypeError as exc:
                raise SignatureError(
                    f"module {plan._handle!r}: the input cannot be converted to a tensor: {exc}",
                    handle=plan._handle,
                ) from exc
            join_dtype = dtype
        else:
            dtype = plan._dtype
            join_dtype = self._host.join_dtype(array, dtype)
        if not any(d == dtype and _fits(dims, spec) for d, spec in self._forms):  # type: ignore[arg-type]
            raise self._refused(dtype, dims)
        key = (join_dtype, dims[1:])
        self._host.remember(array, key)
        return key, dims[0], array

    def _refused(self, dtype: Any, dims: tuple[int | None, ...] | None) -> SignatureError:
        plan = self._plan
        return SignatureError(
            f"module {plan._handle!r}: its callable object does not accept a "
            f"{dtype.name}{_format_shape(dims)} tensor; it accepts "
            f"{plan._accepted()} (or pass signature=)",
            handle=plan._handle,
        )


def _natural_tensors(tf: Any) -> Callable[[Any], Any]:
    """A function giving a numpy array as a tensor of its own dtype (anything else as
    it is): what a callable object's binder without one input dtype leaves to the call."""
    import numpy as np

    ndarray, to_tensor = np.ndarray, host_converter(tf)

    def convert(payload: Any) -> Any:
        if type(payload) is not ndarray:
            return payload
        return to_tensor(payload, tf.as_dtype(payload.dtype))

    return convert


def _numpy_outputs(tf: Any) -> Callable[[Any], Any]:
    """A function giving a call's result with each tensor in it as a numpy array."""
    is_tensor, map_structure = tf.is_tensor, tf.nest.map_structure

    def host(value: Any) -> Any:
        return value.numpy() if is_tensor(value) else value

    def to_numpy(result: Any) -> Any:
        if is_tensor(result):
            return result.numpy()
        if type(result) is dict:
            return {name: host(value) for name, value in result.items()}
        return map_structure(host, result)

    return to_numpy


# --- the module -----------------------------------------------------------------------


class Module:
    """A loaded SavedModel, applied with ``m(inputs, signature=..., as_dict=...)``.

    Calls are thread-safe; the per-signature plans are built on first use. From
    async code, ``await m.acall(...)`` and ``await m.batched(...)(...)`` keep the
    event loop running, on asyncio and trio.
    """

    def __init__(self, obj: Any, *, path: Path, handle: str) -> None:
        """Wrap ``obj``, the result of ``tf.saved_model.load(path)``."""
        self._tf = import_tensorflow()
        self._obj = obj
        self._path = Path(path)
        self._handle = handle
        self._functions: dict[str, Any] = dict(getattr(obj, "signatures", None) or {})
        self._signatures = _SignatureMap(
            {name: SignatureInfo.from_function(name, fn) for name, fn in self._functions.items()}
        )
        self._plans: dict[str | None, _Plan] = {}
        self._batchers: dict[tuple[Any, ...], Batched] = {}
        self._tracked: tuple[Any, ...] | None = None

    def __call__(
        self,
        inputs: Any,
        /,
        *,
        signature: str | None = None,
        as_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Apply the module to ``inputs``.

        Without ``signature``, calls the loaded object if it is callable (passing
        ``inputs`` and ``kwargs`` such as ``training=``), else the signature
        ``"default"``, else ``"serving_default"``, else the only one. With a
        signature, ``inputs`` is a dict of input name to value, or a lone value for
        a single-input signature; values that are not tensors are converted to the
        input's dtype. ``as_dict=True`` returns every output by name; otherwise the
        output ``"default"``, or the only output, is returned.
        """
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plan(signature)
        return plan(inputs, as_dict, kwargs)

    async def acall(
        self,
        inputs: Any,
        /,
        *,
        signature: str | None = None,
        as_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``m(inputs, signature=..., as_dict=..., **kwargs)`` in a worker thread.

        Same result, same errors; the event loop keeps running meanwhile. Calls share
        a few threads of the module's own per event loop, since more would only fight
        over the GIL. A cancelled call returns once the running TensorFlow call ends:
        that cannot be interrupted, and nothing is left running behind.
        """
        call = functools.partial(self.__call__, inputs, signature=signature, as_dict=as_dict)
        if kwargs:
            call = functools.partial(call, **kwargs)
        return await in_thread(self, call)

    def batched(
        self,
        signature: str | None = None,
        *,
        max_batch_size: int = 64,
        max_delay: float = 0.002,
        max_queue: int | None = None,
        as_dict: bool = False,
        as_numpy: bool = False,
    ) -> Batched:
        """An async callable that joins concurrent requests into one call of the module.

        ``await b(inputs)`` takes one request, a batch of n >= 1 rows (a dict of them for
        several inputs), and returns what ``m(inputs, signature=..., as_dict=...)``
        returns for it. Requests arriving within ``max_delay`` seconds of the oldest
        waiting one are joined along axis 0, up to ``max_batch_size`` rows, if their
        dtypes and non-batch shapes agree; a bigger request runs alone. With
        ``max_queue``, a request that finds that many rows already waiting fails at
        once with :class:`~asynchub._batching.QueueFullError`; without, it waits.
        ``as_numpy=True`` returns numpy arrays (what ``.numpy()`` of the tensors gives),
        taken from the batch's output once and cut into views: for code that goes on
        in numpy, such as a server encoding its answers.

        The same arguments give the same batcher. Raises :class:`SignatureError` if
        the signature (or callable object) has an input or an output it returns
        without a leading batch dimension (every one must have it, as in Triton: only
        then can a batch's result be split back by rows), or if ``as_dict=False`` has
        no single output to return.
        """
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, not {max_batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if not (isinstance(max_delay, (int, float)) and 0 <= max_delay < math.inf):
            raise ValueError(
                f"max_delay must be a finite number of seconds >= 0, got {max_delay!r}"
            )
        if max_queue is not None and (
            isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1
        ):
            raise ValueError(f"max_queue must be None or an int >= 1, got {max_queue!r}")
        key = (signature, as_dict, as_numpy, max_batch_size, float(max_delay), max_queue)
        batcher = self._batchers.get(key)
        if batcher is not None:
            return batcher
        plan = self._plans.get(signature) or self._plan(signature)
        bind: Binder
        tf = self._tf
        prepare: Callable[[Any], Any] | None = None
        if isinstance(plan, _SignaturePlan):
            if plan._output is None and not as_dict:
                raise plan._ambiguous_output()
            bind, what = _SignatureBinder(plan), f"batched {plan._where}"
            outputs = plan._fn.structured_outputs
            if not as_dict and isinstance(outputs, Mapping):
                outputs = {plan._output: outputs[plan._output]}  # the only one returned
            _require_batch_outputs(tf, plan._where, outputs, self._handle)
        elif isinstance(plan, _CallablePlan):
            callable_binder = _CallableBinder(plan)
            bind, what = callable_binder, f"batched module {self._handle!r}"
            if callable_binder.natural:
                prepare = _natural_tensors(tf)
        else:  # pragma: no cover - every plan is one of the two
            raise TypeError(f"unexpected plan {plan!r}")

        to_numpy = _numpy_outputs(tf) if as_numpy else None

        def call(payload: Any) -> Any:
            if prepare is not None:
                payload = prepare(payload)
            result = plan(payload, as_dict, {})
            return result if to_numpy is None else to_numpy(result)

        batcher = Batched(
            owner=self,
            tf=self._tf,
            bind=bind,
            call=call,
            what=what,
            handle=self._handle,
            max_batch_size=max_batch_size,
            max_delay=float(max_delay),
            max_queue=max_queue,
        )
        # Two threads may race to make the same batcher; each works, one is kept.
        return self._batchers.setdefault(key, batcher)

    def _plan(self, signature: str | None) -> _Plan:
        plan: _Plan
        if signature is None:
            if callable(self._obj):
                plan = _CallablePlan(self._tf, self._obj, self._handle)
            else:
                name = default_signature(list(self._functions), handle=self._handle)
                plan = self._plans.get(name) or self._plan(name)
        else:
            fn = self._functions.get(signature)
            if fn is None:
                available = ", ".join(sorted(self._functions)) or "none"
                raise SignatureError(
                    f"module {self._handle!r} has no signature {signature!r}; it has: {available}",
                    handle=self._handle,
                )
            plan = _SignaturePlan(self._tf, fn, self._signatures[signature], self._handle)
        # Two threads may race to build the same plan; both results are equivalent.
        self._plans[signature] = plan
        return plan

    @property
    def signatures(self) -> Mapping[str, SignatureInfo]:
        """Signature name to its inputs and outputs (read-only)."""
        return self._signatures

    @property
    def variables(self) -> list[tf.Variable]:
        """Every variable of the SavedModel.

        Its ``variables`` attribute where it has one (TF Hub's reusable form, Keras);
        else each variable its object graph tracks, once (a plain ``tf.Module`` export).
        """
        if hasattr(self._obj, "variables"):
            return list(self._obj.variables)
        return list(self._tracked_variables())

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        """The variables to fine-tune.

        The SavedModel's ``trainable_variables`` attribute; ``[]`` if it has a
        ``variables`` attribute but not this one (the reusable form's way of saying
        none); else the trainable ones among those its object graph tracks.
        """
        if hasattr(self._obj, "trainable_variables"):
            return list(self._obj.trainable_variables)
        if hasattr(self._obj, "variables"):
            return []
        return [v for v in self._tracked_variables() if v.trainable]

    def _tracked_variables(self) -> tuple[Any, ...]:
        found = self._tracked
        if found is None:
            tf = self._tf
            # The graph of a SavedModel does not change once loaded: walk it once.
            view = getattr(tf.train, "TrackableView", None)
            nodes = view(self._obj).descendants() if view is not None else ()
            unique: dict[int, Any] = {}
            for node in nodes:
                if isinstance(node, tf.Variable):
                    unique.setdefault(id(node), node)
            self._tracked = found = tuple(unique.values())
        return found

    @property
    def regularization_losses(self) -> list[Callable[[], Any]]:
        """The SavedModel's ``regularization_losses``: functions of no arguments, or ``[]``."""
        return list(getattr(self._obj, "regularization_losses", ()))

    @property
    def path(self) -> Path:
        """The SavedModel directory."""
        return self._path

    @property
    def handle(self) -> str:
        """The handle the module was loaded from."""
        return self._handle

    @property
    def obj(self) -> Any:
        """The object ``tf.saved_model.load`` returned."""
        return self._obj

    def __repr__(self) -> str:
        extra = ", callable=True" if callable(self._obj) else ""
        return f"Module(handle={self._handle!r}, signatures={sorted(self._signatures)!r}{extra})"


# --- loading --------------------------------------------------------------------------


def load_module(
    path: Path,
    *,
    handle: str,
    tags: Iterable[str] | None = None,
    options: tf.saved_model.LoadOptions | None = None,
) -> Module:
    """Load the SavedModel in ``path`` with ``tf.saved_model.load`` and wrap it.

    ``tags`` picks one MetaGraph of a SavedModel that has several. Raises
    :class:`ModuleError` if ``path`` holds no ``saved_model.pb``/``.pbtxt`` or
    TensorFlow cannot load it. Blocking: call it in a worker thread from async code.
    """
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ModuleError(f"module {handle!r}: {path} {what}", handle=handle)
    if not any((path / name).is_file() for name in _SAVED_MODEL_FILES):
        raise ModuleError(
            f"module {handle!r}: {path} is not a SavedModel, it holds no "
            f"{' or '.join(_SAVED_MODEL_FILES)}; {_describe_dir(path)}",
            handle=handle,
        )
    tf = import_tensorflow()
    # A lone string is an iterable of characters; nobody means that.
    tag_list = [tags] if isinstance(tags, str) else None if tags is None else list(tags)
    with gc_paused():  # see gc_paused: a load is a burst of long-lived objects
        try:
            obj = tf.saved_model.load(str(path), tags=tag_list, options=options)
        except Exception as exc:  # TensorFlow raises many unrelated types here; wrap them all
            with_tags = f" with tags={sorted(tag_list)!r}" if tag_list is not None else ""
            raise ModuleError(
                f"module {handle!r}: TensorFlow could not load the SavedModel in {path}"
                f"{with_tags}: {exc}",
                handle=handle,
            ) from exc
        return Module(obj, path=path, handle=handle)


def _describe_dir(path: Path) -> str:
    """A short listing of ``path`` for error messages, with a hint if the model is nested."""
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    if not entries:
        return "it is empty"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:_LISTING_LIMIT]]
    if len(entries) > _LISTING_LIMIT:
        names.append(f"... and {len(entries) - _LISTING_LIMIT} more")
    text = "it holds: " + ", ".join(names)
    nested = [
        e for e in entries if e.is_dir() and any((e / n).is_file() for n in _SAVED_MODEL_FILES)
    ]
    if len(nested) == 1:
        text += f" (did you mean {nested[0]}?)"
    elif any(e.name == "tfhub_module.pb" for e in entries):
        text += " (that is the TF1 Hub format, which only tensorflow_hub's hub.Module reads)"
    return text
