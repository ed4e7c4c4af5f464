"""Type aliases shared across the package."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeAlias, Union

if TYPE_CHECKING:
    from ._progress import ProgressEvent

#: A module handle: a local directory or archive (str or PathLike), a ``file://`` URL,
#: or an ``http(s)://`` URL.
Handle: TypeAlias = Union[str, "os.PathLike[str]"]

#: Called with each progress event; must be cheap and must not block.
ProgressCallback: TypeAlias = Callable[["ProgressEvent"], None]

#: ``prefetch``'s worker processes: None or 1 for none, N to use up to N, or
#: ``"auto"`` to decide from the cores and the downloads (``_workers.plan_processes``).
Processes: TypeAlias = int | Literal["auto"] | None
