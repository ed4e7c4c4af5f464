"""Type aliases shared across the package."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, Union

if TYPE_CHECKING:
    from ._progress import ProgressEvent

#: A module handle: a local directory or archive (str or PathLike), a ``file://`` URL,
#: or an ``http(s)://`` URL.
Handle: TypeAlias = Union[str, "os.PathLike[str]"]

#: Called with each progress event; must be cheap and must not block.
ProgressCallback: TypeAlias = Callable[["ProgressEvent"], None]
