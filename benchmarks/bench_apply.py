"""The apply hot path: ``m(x)`` against TensorFlow's own calls, at batch size 1.

Run from the repository root::

    python -m benchmarks.bench_apply [--number 2000] [--repeat 7] [--batch 1]

It saves a 64 -> 32 dense module twice (once with only a ``serving_default``
signature, once also callable), then times, interleaved so that drift hits every
case alike, the best of ``--repeat`` rounds of ``--number`` calls each:

- ``raw signature``: ``tf.saved_model.load(path).signatures[name](x=x)``, the baseline;
- ``raw flat``: the concrete function's flat entry point, the floor asynchub aims at;
- ``m(x)``: asynchub on the non-callable module, which resolves to the signature;
- ``m(x, signature=)``: the same signature named explicitly;
- ``raw obj(x)`` and ``m(x) callable``: the callable module, raw and through asynchub.

The design goal is ``m(x) / raw signature <= 1.05``.

Recorded on 2 shared CPU cores, TensorFlow 2.21, batch 1, µs per call (two runs):
raw signature 130 / 149, raw flat 91 / 117, m(x) 89 / 116 (ratio 0.68 / 0.78),
m(x, signature=) 90 / 104, raw obj(x) 227 / 221, m(x) callable 77 / 96. Before the
plan (resolve, bind, ``convert_to_tensor`` and keyword call on every call): 1.10x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(tf: Any, path: Path, *, callable_: bool) -> None:
    """Save a 64 -> 32 dense layer; with ``callable_`` it also has a restored ``__call__``."""
    module = tf.Module()
    module.w = tf.Variable(tf.random.stateless_normal([64, 32], seed=[1, 2]))
    module.b = tf.Variable(tf.zeros([32]))
    spec = [tf.TensorSpec([None, 64], tf.float32, name="x")]

    @tf.function(input_signature=spec)
    def dense(x: Any) -> Any:
        return tf.matmul(x, module.w) + module.b

    if callable_:
        module.__call__ = dense
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": dense.get_concrete_function()}
    )


def measure(cases: dict[str, Callable[[], Any]], *, number: int, repeat: int) -> dict[str, float]:
    """Best seconds per call for each case, the cases interleaved round by round."""
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():
        fn()  # warm up: first calls trace, build plans and fill caches
    for _ in range(repeat):
        for name, fn in cases.items():
            best[name] = min(best[name], timeit.timeit(fn, number=number) / number)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best is kept")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    import tensorflow as tf

    from asynchub._module import load_module

    with tempfile.TemporaryDirectory() as tmp:
        plain, both = Path(tmp, "plain"), Path(tmp, "callable")
        build(tf, plain, callable_=False)
        build(tf, both, callable_=True)
        raw = tf.saved_model.load(str(plain))
        raw_callable = tf.saved_model.load(str(both))
        m = load_module(plain, handle=str(plain))
        mc = load_module(both, handle=str(both))

    x = tf.random.stateless_normal([args.batch, 64], seed=[3, 4])
    signature = raw.signatures["serving_default"]
    captured = signature.captured_inputs
    expected = signature(x=x)["output_0"].numpy()
    for name, got in [("m(x)", m(x)), ("m(x) callable", mc(x)), ("raw obj(x)", raw_callable(x))]:
        if not (got.numpy() == expected).all():
            raise SystemExit(f"{name} disagrees with the raw signature call")

    cases: dict[str, Callable[[], Any]] = {
        "raw signature": lambda: signature(x=x),
        "raw flat": lambda: signature._call_flat([x], captured),
        "m(x)": lambda: m(x),
        "m(x, signature=)": lambda: m(x, signature="serving_default"),
        "m(x, as_dict=True)": lambda: m(x, as_dict=True),
        "raw obj(x)": lambda: raw_callable(x),
        "m(x) callable": lambda: mc(x),
    }
    best = measure(cases, number=args.number, repeat=args.repeat)
    base = best["raw signature"]
    print(f"batch {args.batch}, best of {args.repeat} x {args.number} calls, TF {tf.__version__}")
    for name, seconds in best.items():
        print(f"  {name:20s} {seconds * 1e6:8.1f} us   {seconds / base:5.2f}x raw signature")
    ratio = best["m(x)"] / base
    verdict = "within" if ratio <= 1.05 else "OUTSIDE"
    print(f"m(x) / raw signature = {ratio:.3f} ({verdict} the 5% budget)")


if __name__ == "__main__":
    main()
