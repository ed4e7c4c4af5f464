"""TensorFlow, imported only where it is needed.

TensorFlow takes seconds to import and is an optional extra, so nothing in
asynchub imports it at module level; code that needs it calls
:func:`import_tensorflow` at the point of use.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .errors import MissingDependencyError

__all__ = [
    "INSTALL_HINT",
    "gc_paused",
    "host_converter",
    "host_types",
    "import_tensorflow",
    "import_tensorflow_soon",
]

INSTALL_HINT = 'pip install "asynchub[tensorflow]"'


def import_tensorflow() -> Any:
    """Return the ``tensorflow`` module, importing it on first use.

    Raises :class:`MissingDependencyError`, with the command that installs it,
    when TensorFlow is not installed.
    """
    if sys.modules.get("tensorflow") is not None:  # imported, or under way in a thread
        import tensorflow  # (then this waits for it)

        return tensorflow
    try:
        with gc_paused():
            import tensorflow
    except ImportError as exc:
        raise MissingDependencyError(
            "TensorFlow is needed to load and apply modules, but it is not installed "
            f"({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return tensorflow


#: Objects made during a pause past which its end runs one full collection (an
#: import of TensorFlow makes ~450,000; a small module's load, ~10,000).
_COLLECT_AFTER = 100_000
_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while the block runs, then as it was.

    For TensorFlow's import and a SavedModel's load: each makes hundreds of
    thousands of long-lived objects and little garbage, and the collector,
    counting them, runs full collections over the whole heap meanwhile (four to
    six for ``import tensorflow``, 0.07-0.18 s each with Ray loaded). When the
    last pause ends, a burst of more than ``_COLLECT_AFTER`` objects gets one
    full collection at once, which also takes what garbage it left; a smaller
    one is left to the collector. Nested and concurrent pauses (threads) end
    together; a collector that was disabled stays disabled.
    """
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            resume = _pauses == 0 and _was_enabled
            if resume:
                gc.enable()
        if resume and gc.get_count()[0] > _COLLECT_AFTER:
            # Left alone, the collector would pass over all these young objects three
            # times (young, middle, then a full pass), the last ones in the caller's
            # first calls; one full pass now costs about one of those.
            gc.collect()


_importing = threading.Lock()
_started = False


def import_tensorflow_soon() -> None:
    """Start importing TensorFlow in a daemon thread, unless it is imported or under way.

    For a caller that will need it after a wait of its own (a download): the
    seconds of the import overlap the wait, and the later :func:`import_tensorflow`
    returns once this import is done (the import system's lock on the module).
    Any error is left for that later call to raise. A daemon thread: a process that
    exits meanwhile (the download failed, Ctrl-C) does not wait for the import.
    """
    global _started
    if "tensorflow" in sys.modules:
        return
    with _importing:
        if _started:
            return
        _started = True
    threading.Thread(target=_import_quietly, name="asynchub-import-tensorflow", daemon=True).start()


def _import_quietly() -> None:
    try:
        import_tensorflow()
    except BaseException:  # the caller's own import_tensorflow() raises it
        return


def host_types() -> frozenset[type]:
    """The types of host values (numpy arrays and scalars, lists, Python numbers)
    that :func:`host_converter` converts."""
    import numpy as np

    scalars = {t for t in np.sctypeDict.values() if issubclass(t, np.number | np.bool_)}
    return frozenset({np.ndarray, list, tuple, int, float, bool, *scalars})


def host_converter(tf: Any) -> Callable[[Any, Any], Any]:
    """A function ``(value, dtype) -> tensor``: ``tf.convert_to_tensor(value, dtype=dtype)``
    for a host value, in fewer steps, or ``None`` when not executing eagerly.

    Eagerly, TensorFlow's conversion of a numpy array, a list or a number ends in
    the eager tensor's constructor (``constant_op.convert_to_eager_tensor``), after a
    lookup in its conversion registry and several calls that cost more than the
    constructor itself. This calls the constructor as TensorFlow does: same values,
    same errors, a numpy array copied first so that the tensor never shares the
    caller's memory. Any sign that those private names changed falls back to the
    public conversion. Inside a ``tf.function`` it returns ``None``: the caller
    must take TensorFlow's own path, which makes a symbolic constant.
    """
    import numpy as np

    ndarray = np.ndarray
    try:
        from tensorflow.python.eager import context
        from tensorflow.python.framework import ops

        make, current = ops.EagerTensor, context.context
        current().ensure_initialized()
        probe = make(
            np.zeros((1, 2), np.float64), current().device_name, tf.float32.as_datatype_enum
        )
        if probe.dtype != tf.float32 or tuple(probe.shape) != (1, 2):
            raise TypeError("unexpected probe result")
    except Exception:  # a private-API probe: any failure means the public path
        convert_public = tf.convert_to_tensor

        def convert(value: Any, dtype: Any) -> Any:
            if not tf.executing_eagerly():
                return None
            return convert_public(value, dtype=dtype)

        return convert

    def convert_fast(value: Any, dtype: Any) -> Any:
        ctx = current()
        if not ctx.executing_eagerly():
            return None
        if type(value) is ndarray:
            value = value.copy()
        return make(value, ctx.device_name, dtype.as_datatype_enum)

    return convert_fast
