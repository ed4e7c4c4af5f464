"""How ``asynchub serve --infer`` serves predictions: :class:`InferOptions`.

A module of its own, below both the module host (``hosting.py``) and the inference
endpoint (``infer.py``): the host takes the options without importing the endpoint
(numpy, the module loader) until predictions are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InferOptions"]


@dataclass(frozen=True)
class InferOptions:
    """How ``/v2`` predictions are served (``asynchub serve --infer``).

    ``preload`` loads every module under ROOT at start-up instead of on first use.
    With ``batching``, concurrent requests to one model and signature are joined by
    :meth:`asynchub.Module.batched` (``max_batch_size`` rows, ``max_delay`` seconds);
    without, each runs alone with :meth:`~asynchub.Module.acall`. A request that finds
    ``max_queue`` rows already waiting is refused at once with 503 (``None``: it waits).
    """

    preload: bool = False
    batching: bool = True
    max_batch_size: int = 64
    max_delay: float = 0.002
    max_queue: int | None = 4096

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not 0 <= self.max_delay < float("inf"):
            raise ValueError(f"max_delay must be seconds >= 0, got {self.max_delay!r}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be None or an int >= 1, got {self.max_queue!r}")
