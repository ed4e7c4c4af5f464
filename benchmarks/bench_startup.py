"""The first answer from a fresh interpreter: import, resolve, load, one call.

What a script, a notebook kernel or a Ray actor waits for before its first
prediction. Each sample is a new ``python -c`` process that imports its library,
loads Keras MobileNetV2 (random weights, exported and packed by asynchub, a 13 MB
archive) and applies it to one image; the child times itself from its first line
to the answer (``.numpy()``), so interpreter start and exit are not counted.

- cached: the module is in the cache (or, for the baseline, unpacked on disk).
  Baseline: ``import tensorflow; tf.saved_model.load(dir)``, the floor any
  library stands on. tensorflow_hub's ``hub.load(url)`` and asynchub's.
- far origin, empty cache: the archive comes from bench_far's origin (one
  connection capped at ``rate``, ``latency`` before each answer). Baseline:
  tensorflow_hub's ``hub.load(url)``.

Cases take turns round by round; ratio = the baseline's seconds ÷ the case's in
the same round (> 1: sooner).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import _harness as h
from ._work import Section, Work, log, static_server
from .bench_far import far_origin

#: bytes/s per connection and seconds before each answer of the far origin
RATE, LATENCY = 12_500_000, 0.030
_ROUNDS = (3, 1)

_TIMED = """
import time
_t0 = time.perf_counter()
import numpy as np
{body}
y = m(np.zeros((1, {side}, {side}, 3), np.float32))
y = y.numpy() if hasattr(y, "numpy") else y
print("seconds", time.perf_counter() - _t0, y.shape)
"""
TF = "import tensorflow as tf\nm = tf.saved_model.load({path!r})"
TFHUB = "import tensorflow_hub as hub\nm = hub.load({url!r})"
HUB = "import asynchub\nm = asynchub.load({url!r})"


def _child(body: str, cache: Path | None, side: int, *, empty: bool = False) -> float:
    """Seconds the child took from its first line to its first answer on one ``side``²
    image; ``cache`` is its TFHUB_CACHE_DIR, emptied first if ``empty``."""
    if cache is not None and empty:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if cache is not None:
        env["TFHUB_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-c", _TIMED.format(body=body, side=side)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("seconds ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return float(lines[-1].split()[1])


def run(work: Work) -> list[Section]:
    quick = 1 if work.quick else 0
    rounds = _ROUNDS[quick]
    side = 96 if work.quick else 224  # the image side, as _work._application builds it
    archive = work.keras_archive("MobileNetV2")
    module = work.keras_module("MobileNetV2")
    www = work.fresh_dir("startup-www")
    shutil.copy(archive, www / "m.tar.gz")
    warm = {name: work.root / f"startup-{name}" for name in ("tfhub", "asynchub")}
    section = Section(
        title="Startup: a fresh interpreter's first answer (MobileNetV2, 13 MB archive)",
        note=(
            "Each sample is a new `python -c` process: import, resolve, load, one call "
            "on one 224x224 image, timed by the child from its first line to `.numpy()`. "
            "cached = the module is in the cache (the baseline loads the unpacked dir "
            f"with `tf.saved_model.load`); far = empty cache, bench_far's origin at "
            f"{RATE / 1e6:.1f} MB/s a connection and {LATENCY * 1e3:.0f} ms before each "
            f"answer (baseline: tensorflow_hub). Medians of {rounds} rounds in rotated "
            "order; ratio = baseline seconds ÷ case seconds in the same round, "
            "median [min, max]."
        ),
        columns=["case", "seconds", "ratio", "against"],
    )
    results: dict[str, tuple[list[float], str]] = {}
    with static_server(www) as base:
        url = f"{base}/m.tar.gz"
        for name, cache in warm.items():  # fill each library's cache once, untimed
            env = {**os.environ, "TFHUB_CACHE_DIR": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
            resolve = (
                "import tensorflow_hub as hub; hub.resolve"
                if name == "tfhub"
                else "import asynchub; asynchub.resolve"
            )
            subprocess.run(
                [sys.executable, "-c", f"{resolve}({url!r})"], env=env, check=True, timeout=300
            )
        cached = {
            "TensorFlow alone, tf.saved_model.load(dir)": lambda: _child(
                TF.format(path=str(module)), None, side
            ),
            "tensorflow_hub hub.load, cached": lambda: _child(
                TFHUB.format(url=url), warm["tfhub"], side
            ),
            "asynchub.load, cached": lambda: _child(HUB.format(url=url), warm["asynchub"], side),
        }
        log("startup: cached")
        samples = h.interleave(cached, rounds=rounds, warmup=1 - quick)
        ratios = h.ratio_to(samples, next(iter(cached)))
        for name in cached:
            results[name] = (samples[name], ratios[name].fmt(2))
    with far_origin(www, rate=RATE, latency=LATENCY) as far_base:
        url = f"{far_base}/m.tar.gz"
        empty = work.root / "startup-empty"
        far = {
            "tensorflow_hub hub.load, far, empty cache": lambda: _child(
                TFHUB.format(url=url), empty, side, empty=True
            ),
            "asynchub.load, far, empty cache": lambda: _child(
                HUB.format(url=url), empty, side, empty=True
            ),
        }
        log("startup: far origin")
        samples = h.interleave(far, rounds=rounds, warmup=0)
        ratios = h.ratio_to(samples, next(iter(far)))
        for name in far:
            results[name] = (samples[name], ratios[name].fmt(2))
    for name, (values, ratio) in results.items():
        against = (
            "TensorFlow alone"
            if "cached" in name or name.startswith("TensorFlow")
            else "tensorflow_hub, far"
        )
        section.rows.append([name, f"{h.Spread.of(values).median:.2f}", ratio, against])
        section.data[name] = {"seconds": values, "ratio": ratio}
    return [section]


if __name__ == "__main__":
    work = Work(quick="--quick" in sys.argv)
    try:
        for s in run(work):
            print(s.markdown())
            print(json.dumps(s.data))
    finally:
        work.close()
