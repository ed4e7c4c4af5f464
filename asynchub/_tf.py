"""TensorFlow, imported only where it is needed.

TensorFlow takes seconds to import and is an optional extra, so nothing in
asynchub imports it at module level; code that needs it calls
:func:`import_tensorflow` at the point of use.
"""

from __future__ import annotations

from typing import Any

from .errors import MissingDependencyError

__all__ = ["INSTALL_HINT", "import_tensorflow"]

INSTALL_HINT = 'pip install "asynchub[tensorflow]"'


def import_tensorflow() -> Any:
    """Return the ``tensorflow`` module, importing it on first use.

    Raises :class:`MissingDependencyError`, with the command that installs it,
    when TensorFlow is not installed.
    """
    try:
        import tensorflow
    except ImportError as exc:
        raise MissingDependencyError(
            "TensorFlow is needed to load and apply modules, but it is not installed "
            f"({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return tensorflow
