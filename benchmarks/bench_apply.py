"""The apply hot path: rows/s of ``m(x)`` beside TensorFlow's and tensorflow_hub's own calls.

Each model (a tiny MLP, Keras MobileNetV2 at 224x224, both with random weights)
is exported once with ``asynchub``'s ``export`` and loaded five ways; at each
batch size every case is warmed up, checked against the baseline's output, then
timed in interleaved rounds. The baseline is the raw keyword call
``tf.saved_model.load(p).signatures[name](**{input: x})``; a ratio is the case's
rows/s over the baseline's rows/s in the same round (> 1: faster).
"""

from __future__ import annotations

import math
from typing import Any

from . import _harness as h
from ._work import Section, Work, log

BASELINE = "raw signature"
#: Seconds one timed sample should last; shorter calls are repeated to fill it.
_SAMPLE = 0.02
#: Time budget (quick, full) for the timed rounds of one (model, batch); rounds stay within
#: the bounds. Short samples, many rounds: on shared cores a neighbour's burst then spoils
#: a few paired ratios, which the median drops, rather than a few long samples.
_BUDGET = (3.0, 8.0)
_ROUNDS = (3, 41)


def _cases(tf: Any, path: str) -> tuple[dict[str, Any], Any]:
    import tensorflow_hub as thub
    import tf_keras

    import asynchub

    raw = tf.saved_model.load(path)
    sig = raw.signatures["serving_default"]
    (name,) = sig.structured_input_signature[1]
    m = asynchub.load(path)
    peer = thub.load(path)
    peer_sig = peer.signatures["serving_default"]
    shape = sig.structured_input_signature[1][name].shape[1:]
    keras_model = tf_keras.Sequential([tf_keras.Input(shape), thub.KerasLayer(path)])
    # Each case returns the output tensor, so the check compares like with like.
    cases = {
        BASELINE: lambda x: sig(**{name: x})["default"],
        "raw obj(x)": lambda x: raw(x),
        "asynchub m(x)": lambda x: m(x),
        "asynchub m(x, signature=)": lambda x: m(x, signature="serving_default"),
        "hub.load signature": lambda x: peer_sig(**{name: x})["default"],
        "hub.load obj(x)": lambda x: peer(x),
        "hub.KerasLayer in tf_keras": lambda x: keras_model(x, training=False),
    }
    return cases, shape


def _measure(tf: Any, cases: dict[str, Any], x: Any, *, quick: bool) -> dict[str, list[float]]:
    import numpy as np

    expected = cases[BASELINE](x).numpy()
    for label, fn in cases.items():
        got = fn(x).numpy()  # also the first warm-up call: traces, plans, caches
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{label} disagrees with {BASELINE} at batch {x.shape[0]}")
    number, single = h.calibrate(lambda: cases[BASELINE](x), _SAMPLE)
    per_round = len(cases) * max(single * number, _SAMPLE)
    budget = _BUDGET[0] if quick else _BUDGET[1]
    rounds = max(_ROUNDS[0], min(_ROUNDS[1], math.floor(budget / per_round)))
    if quick:
        rounds = min(rounds, 3)
    # A call of several seconds needs no warm-up round: the check above ran each case once.
    warmup = 1 if single < 0.5 else 0
    measures = {label: h.per_call(lambda fn=fn: fn(x), number) for label, fn in cases.items()}
    return h.interleave(measures, rounds=rounds, warmup=warmup)


def run(work: Work) -> list[Section]:
    import tensorflow as tf

    batches = (1, 32) if work.quick else (1, 32, 256)
    section = Section(
        title="Apply: rows/s by batch size",
        note=(
            "Baseline: `tf.saved_model.load(p).signatures['serving_default'](**{name: x})`. "
            "Ratio = rows/s ÷ the baseline's rows/s in the same round, median [min, max] "
            "over rounds; > 1 is faster. Every case's output is checked against the "
            "baseline's first. Models exported by `asynchub.export` with random weights; "
            "`m(x)` calls the module's restored `__call__` (it is callable)."
        ),
        columns=["model", "batch", "case", "rows/s", "ratio", "µs/call", "rounds"],
    )
    for model in ("MLP", "MobileNetV2"):
        path = str(work.keras_module(model))
        cases, shape = _cases(tf, path)
        for batch in batches:
            x = tf.random.stateless_uniform([batch, *shape], seed=[1, batch])
            log(f"apply: {model} batch {batch}")
            samples = _measure(tf, cases, x, quick=work.quick)
            ratios = h.ratio_to(samples, BASELINE)
            for label, seconds in samples.items():
                call = h.Spread.of(seconds)
                rows = h.Spread.of([batch / s for s in seconds])
                section.rows.append(
                    [
                        model,
                        str(batch),
                        label,
                        rows.fmt(0),
                        ratios[label].fmt(),
                        f"{call.median * 1e6:,.0f}",
                        str(len(seconds)),
                    ]
                )
                section.data.setdefault(model, {}).setdefault(str(batch), {})[label] = {
                    "seconds_per_call": seconds,
                    "rows_per_s": rows.as_json(),
                    "ratio": ratios[label].as_json(),
                }
    return [section]
