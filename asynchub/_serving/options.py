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

    Each request is bounded before its memory is spent: its body may hold at most
    ``max_input_size`` bytes, compressed and once inflated (Triton's
    ``--http-max-input-size``), and must arrive within ``body_timeout`` seconds (413,
    408); its inputs may have at most ``max_request_rows`` rows (first dimension) and
    ``max_request_elements`` values in all (413).
    """

    preload: bool = False
    batching: bool = True
    max_batch_size: int = 64
    max_delay: float = 0.002
    max_queue: int | None = 4096
    max_input_size: int = 64 << 20
    max_request_rows: int = 1 << 16
    max_request_elements: int = 1 << 24
    body_timeout: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not 0 <= self.max_delay < float("inf"):
            raise ValueError(f"max_delay must be seconds >= 0, got {self.max_delay!r}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be None or an int >= 1, got {self.max_queue!r}")
        for name in ("max_input_size", "max_request_rows", "max_request_elements"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.body_timeout < float("inf"):
            raise ValueError(f"body_timeout must be seconds > 0, got {self.body_timeout!r}")
