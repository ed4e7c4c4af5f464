"""The timing harness: warm-up, interleaved rounds, medians of ratios paired by round.

Why not pyperf or pytest-benchmark: both run one benchmark after the other, so
on shared, noisy cores the baseline and the contender see different load; and
pyperf's worker processes would import TensorFlow and load each model twenty
times over, far past the suite's time budget. Here every round runs each case
once, in an order rotated round by round, and a ratio is taken between the
contender and the baseline *of the same round* before the median is taken: a
burst of load from a neighbour hits both sides of a ratio alike.
"""

from __future__ import annotations

import gc
import statistics
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

#: One measurement of a case: runs it, returns the seconds one operation took.
Measure = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """The median of some samples and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no samples")
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor)

    def fmt(self, digits: int = 2) -> str:
        return f"{self.median:,.{digits}f} [{self.low:,.{digits}f}, {self.high:,.{digits}f}]"

    def as_json(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high}


def per_call(fn: Callable[[], object], number: int) -> Measure:
    """A measurement of ``number`` calls of ``fn`` (GC off, as timeit does): seconds per call."""
    timer = timeit.Timer(fn)
    return lambda: timer.timeit(number) / number


def once(
    fn: Callable[[], T],
    *,
    setup: Callable[[], object] | None = None,
    check: Callable[[T], object] | None = None,
) -> Measure:
    """A measurement of one run of ``fn``: untimed ``setup`` before (a fresh cache dir),
    untimed ``check`` of its result after (raises if the run did not do its job)."""

    def measure() -> float:
        if setup is not None:
            setup()
        gc.collect()
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        if check is not None:
            check(result)
        return elapsed

    return measure


def calibrate(fn: Callable[[], object], target: float) -> tuple[int, float]:
    """How many calls of ``fn`` take about ``target`` seconds (at least one), and one call's."""
    started = time.perf_counter()
    fn()
    single = time.perf_counter() - started
    return max(1, round(target / max(single, 1e-7))), single


def interleave(
    cases: Mapping[str, Measure], *, rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per operation of each case, one sample per round.

    Cases run once per round in an order rotated each round, so no case always
    follows the same neighbour; ``warmup`` untimed rounds come first (tracing,
    plans, caches, page cache).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(cases[name]())
    return samples


def ratio_to(samples: Mapping[str, list[float]], baseline: str) -> dict[str, Spread]:
    """Each case's speed relative to the baseline, paired by round (> 1: faster than it)."""
    base = samples[baseline]
    return {
        name: Spread.of([b / s for b, s in zip(base, values, strict=True)])
        for name, values in samples.items()
    }
