"""Retry decisions and schedules: pure functions the tests call directly."""

from __future__ import annotations

import datetime
import email.utils
import random

from ._config import Retries

__all__ = ["is_retryable_status", "parse_retry_after", "retry_delay"]


def is_retryable_status(status: int) -> bool:
    """429 and 5xx are worth another try; other statuses will not change by waiting."""
    return status == 429 or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now: datetime.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def retry_delay(
    retry: int,
    policy: Retries,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to sleep before retry number ``retry`` (0-based).

    ``Retry-After`` wins when the server sent it (capped by ``max_retry_after``);
    otherwise exponential back-off with full jitter, so many clients that failed
    together do not come back together.
    """
    if retry_after is not None:
        return min(retry_after, policy.max_retry_after)
    ceiling = min(policy.max_backoff, policy.backoff * (2**retry))
    return (rng or random).uniform(0.0, ceiling)
