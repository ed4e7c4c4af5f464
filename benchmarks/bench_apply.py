"""The apply hot path: rows/s of ``m(x)`` beside TensorFlow's and tensorflow_hub's own calls.

Each model (a tiny MLP, Keras MobileNetV2 at 224x224, both with random weights)
is exported once with ``asynchub``'s ``export`` and loaded five ways; at each
batch size every case is warmed up, checked against the baseline's output, then
timed in interleaved rounds. Inputs are what users pass: a numpy array (the
headline), and for the MLP, where dispatch is the cost, a ready-made tensor
beside it. The baseline for numpy is the raw keyword call fed the array as a
tensor, ``signatures[name](**{input: tf.constant(x)})``; for tensors, the same
call fed the tensor. A ratio is the case's rows/s over its baseline's rows/s in
the same round (> 1: faster).
"""

from __future__ import annotations

import math
from typing import Any

from . import _harness as h
from ._work import Section, Work, log

BASELINE = "raw signature"
#: Input kinds: how a case's argument is made from the numpy batch.
NUMPY, TENSOR = "numpy", "tensor"
#: Seconds one timed sample should last; shorter calls are repeated to fill it.
_SAMPLE = 0.02
#: Time budget (quick, full) for the timed rounds of one (model, batch); rounds stay within
#: the bounds. Short samples, many rounds: on shared cores a neighbour's burst then spoils
#: a few paired ratios, which the median drops, rather than a few long samples.
_BUDGET = (3.0, 8.0)
_ROUNDS = (3, 41)


def _cases(tf: Any, path: str) -> tuple[dict[str, Any], Any]:
    """Each case as a function of its input (numpy or tensor); the baseline converts
    a numpy input with ``tf.constant``, as code without asynchub would."""
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
    constant = tf.constant
    cases = {
        BASELINE: lambda x: sig(**{name: x if tf.is_tensor(x) else constant(x)})["default"],
        "raw obj(x)": lambda x: raw(x),
        "asynchub m(x)": lambda x: m(x),
        "asynchub m(x, signature=)": lambda x: m(x, signature="serving_default"),
        "hub.load signature": lambda x: peer_sig(**{name: x})["default"],
        "hub.load obj(x)": lambda x: peer(x),
        "hub.KerasLayer in tf_keras": lambda x: keras_model(x, training=False),
    }
    return cases, shape


def _measure(
    tf: Any, cases: dict[tuple[str, str], Any], inputs: dict[str, Any], *, quick: bool
) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of each (input kind, case), interleaved in rounds."""
    import numpy as np

    expected = cases[(NUMPY, BASELINE)](inputs[NUMPY]).numpy()
    for (kind, label), fn in cases.items():
        got = fn(inputs[kind]).numpy()  # also the first warm-up call: traces, plans, caches
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                f"{label} on {kind} disagrees with {BASELINE} at batch {len(inputs[NUMPY])}"
            )
    number, single = h.calibrate(lambda: cases[(NUMPY, BASELINE)](inputs[NUMPY]), _SAMPLE)
    per_round = len(cases) * max(single * number, _SAMPLE)
    budget = _BUDGET[0] if quick else _BUDGET[1]
    rounds = max(_ROUNDS[0], min(_ROUNDS[1], math.floor(budget / per_round)))
    if quick:
        rounds = min(rounds, 3)
    # A call of several seconds needs no warm-up round: the check above ran each case once.
    warmup = 1 if single < 0.5 else 0
    names = {f"{label} on {kind}": (kind, label) for kind, label in cases}
    measures = {
        name: h.per_call(lambda fn=cases[key], x=inputs[key[0]]: fn(x), number)
        for name, key in names.items()
    }
    samples = h.interleave(measures, rounds=rounds, warmup=warmup)
    return {names[name]: values for name, values in samples.items()}


def run(work: Work) -> list[Section]:
    import tensorflow as tf

    batches = (1, 32) if work.quick else (1, 32, 256)
    section = Section(
        title="Apply: rows/s by batch size",
        note=(
            "Inputs are what users pass: `x` a float32 numpy array (the headline), and "
            "for the MLP also a ready-made `tf.Tensor` of the same values. Baseline for "
            "numpy: `tf.saved_model.load(p).signatures['serving_default'](**{name: "
            "tf.constant(x)})`; for a tensor, the same call fed the tensor. "
            "Ratio = rows/s ÷ the baseline's rows/s (same input) in the same round, "
            "median [min, max] over rounds; > 1 is faster. Every case's output is checked "
            "against the baseline's first. Models exported by `asynchub.export` with random "
            "weights; `m(x)` calls the module's restored `__call__` (it is callable). "
            "Goals (MLP): m(numpy) >= 1.5x at batch 1 and >= 1.0x at 256; "
            "m(tensor) >= 1.5x at batch 1."
        ),
        columns=["model", "batch", "input", "case", "rows/s", "ratio", "µs/call", "rounds"],
    )
    for model in ("MLP", "MobileNetV2"):
        path = str(work.keras_module(model))
        cases, shape = _cases(tf, path)
        # Dispatch is the MLP's cost, so that is where numpy and tensors may differ;
        # MobileNetV2's seconds are TensorFlow's whatever the input.
        kinds = (NUMPY, TENSOR) if model == "MLP" else (NUMPY,)
        for batch in batches:
            x = tf.random.stateless_uniform([batch, *shape], seed=[1, batch])
            inputs = {NUMPY: x.numpy(), TENSOR: x}
            log(f"apply: {model} batch {batch}")
            labelled = {(kind, label): fn for kind in kinds for label, fn in cases.items()}
            samples = _measure(tf, labelled, inputs, quick=work.quick)
            for kind in kinds:
                mine = {label: samples[(k, label)] for (k, label) in samples if k == kind}
                ratios = h.ratio_to(mine, BASELINE)
                for label, seconds in mine.items():
                    call = h.Spread.of(seconds)
                    rows = h.Spread.of([batch / s for s in seconds])
                    section.rows.append(
                        [
                            model,
                            str(batch),
                            kind,
                            label,
                            rows.fmt(0),
                            ratios[label].fmt(),
                            f"{call.median * 1e6:,.0f}",
                            str(len(seconds)),
                        ]
                    )
                    data = section.data.setdefault(model, {}).setdefault(str(batch), {})
                    data.setdefault(kind, {})[label] = {
                        "seconds_per_call": seconds,
                        "rows_per_s": rows.as_json(),
                        "ratio": ratios[label].as_json(),
                    }
    return [section]
