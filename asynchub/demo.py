"""The end-to-end demo: ``python -m asynchub.demo`` (or ``python3 dev.py demo``).

It plays publisher and consumer on one machine: builds a small Keras model,
exports it as a reusable SavedModel, packs it as tar.gz, serves it with
``asynchub serve``'s app on 127.0.0.1, fetches it through the async core into a
fresh cache, loads it, applies it, and checks the outputs against the model in
memory. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from . import AsyncHub, ProgressEvent, ProgressKind


def _say(step: str, text: str) -> None:
    print(f"[{step:>7}] {text}", flush=True)


def build_model(seed: int = 0) -> Any:
    """A small classifier with dropout and an L2 kernel regularizer, random weights."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(16,), name="features")
    x = keras.layers.Dense(64, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4))(
        inputs
    )
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="demo_mlp")


async def consume(url: str, cache_dir: Path, x: Any) -> dict[str, Any]:
    """The consumer's side: resolve through the async core, load, apply."""
    received = 0

    def progress(event: ProgressEvent) -> None:
        nonlocal received
        if event.kind is ProgressKind.DOWNLOADING:
            received = event.done
        elif event.kind is not ProgressKind.EXTRACTING:
            _say("event", f"{event.kind.value}: {event.handle}")

    async with AsyncHub(cache_dir=cache_dir, progress=progress) as hub:
        started = time.perf_counter()
        path = await hub.resolve(url)
        fetched = time.perf_counter() - started
        started = time.perf_counter()
        await hub.resolve(url)
        hit = time.perf_counter() - started
        started = time.perf_counter()
        module = await hub.load(url)
        loaded = time.perf_counter() - started
    return {
        "path": path,
        "bytes": received,
        "fetch_s": fetched,
        "hit_s": hit,
        "load_s": loaded,
        "module": module,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asynchub.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the work dir and print it")
    args = parser.parse_args(argv)
    # TF logs a CUDA probe failure at ERROR level on CPU-only machines; the demo is CPU-only.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import numpy as np

    from . import export, pack

    work = Path(tempfile.mkdtemp(prefix="asynchub-demo-"))
    try:
        _say("build", "a Keras model: 16 features -> Dense(64, L2) -> Dropout -> Dense(10)")
        model = build_model()
        export_dir = export(model, work / "export" / "mlp")
        root = work / "modules"
        archive = pack(export_dir, root / "demo" / "mlp" / "1.tar.gz")
        _say("pack", f"{archive.relative_to(work)} ({archive.stat().st_size:,} bytes)")
        x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
        expected = np.asarray(model(x, training=False))

        from .server import create_app, serve_in_thread

        with serve_in_thread(create_app(root)) as base:
            url = f"{base}/demo/mlp/1"
            _say("serve", f"{base}/ (asynchub serve {root.relative_to(work)})")
            result = anyio.run(consume, url, work / "cache", x)

        module = result["module"]
        y = np.asarray(module(x))
        by_name = module(x, signature="serving_default", as_dict=True)
        (name,) = by_name.keys()
        _say("handle", url)
        _say("cache", str(result["path"]))
        _say("bytes", f"{result['bytes']:,} received")
        _say(
            "seconds",
            f"fetch {result['fetch_s']:.3f}  cache hit {result['hit_s'] * 1000:.2f} ms"
            f"  load {result['load_s']:.3f}",
        )
        _say("apply", f"m(x) -> shape {y.shape}, argmax {y.argmax(axis=1).tolist()}")
        _say("apply", f"m(x, signature='serving_default', as_dict=True) -> {{{name!r}: ...}}")
        diff = float(np.max(np.abs(y - expected)))
        _say("check", f"max |hub - in-memory| = {diff:.2e}")
        if diff > 1e-5:
            print("demo: outputs differ from the in-memory model", file=sys.stderr)
            return 1
        print("demo: ok")
        return 0
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
