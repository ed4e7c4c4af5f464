"""Ray Data batch inference: asynchub's Predictor beside the job as Ray's docs write it.

A local Ray cluster of two nodes (``ray.cluster_utils.Cluster``, one logical CPU
each, so one actor per node) runs ``Dataset.map_batches`` over the same
materialized dataset of random float32 rows, for each model:

- **Ray docs**: a callable class that loads ``tf.saved_model.load(path)`` in its
  ``__init__`` and returns ``{"y": model(batch["x"]).numpy()}``, where ``path``
  is a directory every node downloaded and unpacked itself beforehand (urllib
  and tarfile in one task per node, untimed), as a setup script would;
- **asynchub, cold**: ``asynchub.ray.Predictor`` with every node's cache empty:
  the actors download the module through the node's cache during the job;
- **asynchub, warm**: the same after ``prefetch_on_nodes`` (untimed).

Each job's wall time counts what a user waits for: actor start-up (importing
TensorFlow, loading the module, and for "cold" the download) and every batch.
Models are exported by ``asynchub.export`` with random weights (Keras's MLP and
MobileNetV2 at 224x224, as in bench_apply) and served as ``tar.gz`` by
``python -m http.server`` on 127.0.0.1. Jobs run in rotated order per round;
the table shows each case's median over the rounds and its ratio to the Ray
docs job of the same round.

    python -m benchmarks.bench_ray                       # MLP 100k rows, MobileNetV2 2k rows
    python -m benchmarks.bench_ray --rows MLP=100000 MobileNetV2=2000 --rounds 3

Not part of ``python -m benchmarks``: it starts a Ray cluster and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ._work import Section, Work, log, machine, static_server

DEFAULT_ROWS = {"MLP": 100_000, "MobileNetV2": 2_000}
BATCH = {"MLP": 1024, "MobileNetV2": 32}
SHAPES = {"MLP": (64,), "MobileNetV2": (224, 224, 3)}
CASES = ("Ray docs", "asynchub, cold", "asynchub, warm")


class DocsPredictor:
    """The job as Ray's batch inference docs write it, for a TF SavedModel."""

    def __init__(self, name: str) -> None:
        import tensorflow as tf

        # Every node downloaded and unpacked the model here beforehand.
        self.model = tf.saved_model.load(os.path.join(os.environ["BENCH_MODELS"], name))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"y": self.model(batch["x"]).numpy()}


class _Timed:
    """Adds column ``t``: the seconds the batch's call took, spread over its rows, and
    column ``i``: the seconds the actor's constructor took (import, load), spread over
    the rows of its first batch.

    Summed over the output, ``t`` is the time spent inside the callable classes (the
    per-batch hot path) and ``i`` the actors' own start-up; the rest of the wall time
    is Ray's (scheduling, worker processes, moving blocks).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        super().__init__(*args, **kwargs)
        self._init_seconds = time.perf_counter() - started

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        started = time.perf_counter()
        out = super().__call__(batch)  # type: ignore[misc]
        rows = len(out["y"])
        out["t"] = np.full(rows, (time.perf_counter() - started) / rows)
        out["i"] = np.full(rows, self._init_seconds / rows)
        self._init_seconds = 0.0
        return out  # type: ignore[no-any-return]


class TimedDocs(_Timed, DocsPredictor):
    pass


def _timed_predictor() -> type:
    import asynchub.ray

    class TimedPredictor(_Timed, asynchub.ray.Predictor):
        pass

    return TimedPredictor


def _download_here(url: str, dest: str) -> str:
    """A node's own download: urllib into a file, tarfile into ``dest`` (a setup script's)."""
    target = Path(dest)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = target.with_suffix(".tar.gz")
    with urllib.request.urlopen(url) as response, archive.open("wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    archive.unlink()
    return str(target)


def _inputs(batch: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    import numpy as np

    ids = batch["id"]
    rng = np.random.default_rng(int(ids[0]))
    return {"x": rng.random((len(ids), *shape), dtype=np.float32)}


def _on_each_node(ray: Any, fn: Any, *args: Any) -> list[Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn)
    return list(
        ray.get(
            [
                task.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(*args)
                for n in ray.nodes()
                if n["Alive"]
            ]
        )
    )


def run(rows: dict[str, int], rounds: int) -> Section:
    import ray
    from ray.cluster_utils import Cluster

    work = Work(quick=False)
    root = work.root
    caches = [root / f"node{i}-cache" for i in range(2)]
    models = [root / f"node{i}-models" for i in range(2)]
    served = work.fresh_dir("served")
    for name in rows:
        shutil.copy(work.keras_archive(name), served / f"{name}.tar.gz")
    env = [
        {"TFHUB_CACHE_DIR": str(c), "BENCH_MODELS": str(m), "TF_CPP_MIN_LOG_LEVEL": "3"}
        for c, m in zip(caches, models, strict=True)
    ]
    node = {"num_cpus": 1, "object_store_memory": 1_500 * 1024**2}
    # Keep every Ray node, and all of Ray's own traffic, on 127.0.0.1: by default Ray
    # binds to the address of the machine's outward interface. This switch (named for
    # Windows and macOS) makes it use the loopback address; the workers inherit it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "env_vars": env[0]},
    )
    section = Section(
        title="Ray Data batch inference: rows/s of one map_batches job",
        note=(
            "Two Ray nodes on this machine, one actor each (1 CPU), the same materialized "
            "dataset of random float32 rows for every job. Wall time from submit to the last "
            "output: actor start-up (TensorFlow import, load, and for cold the download) plus "
            "every batch. Rows/s in calls: rows ÷ the seconds spent inside the callable "
            "classes' `__call__` (summed over both actors): the per-batch path alone. Ray "
            "docs: `tf.saved_model.load(path)` in the actor's `__init__`, `path` downloaded "
            "by every node itself beforehand (untimed). Medians over rounds; a ratio is "
            "rows/s ÷ the Ray docs job's in the same round, median [min, max] (> 1: faster). "
            "Constructors s: the seconds both actors' constructors took, summed (import, "
            "load, and for cold the download)."
        ),
        columns=[
            "model",
            "rows",
            "batch",
            "case",
            "job wall s",
            "job rows/s",
            "job ratio",
            "rows/s in calls",
            "calls ratio",
            "constructors s",
        ],
    )
    try:
        cluster.add_node(**node, env_vars=env[1])
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with static_server(served) as base:
            for name, n in rows.items():
                _model(ray, section, name, n, f"{base}/{name}.tar.gz", rounds, caches)
    finally:
        ray.shutdown()
        cluster.shutdown()
        work.close()
    return section


def _model(
    ray: Any,
    section: Section,
    name: str,
    n: int,
    url: str,
    rounds: int,
    caches: list[Path],
) -> None:
    """Every case of one model, ``rounds`` times in rotated order: a row per case."""
    import asynchub.ray as hub_ray

    data = (
        ray.data.range(n, override_num_blocks=max(8, n // (BATCH[name] * 8)))
        .map_batches(_inputs, fn_kwargs={"shape": SHAPES[name]}, batch_size=BATCH[name])
        .materialize()
    )
    log(f"ray: {name}: {n} rows of {SHAPES[name]} materialized")
    walls: dict[str, list[float]] = {case: [] for case in CASES}
    calls: dict[str, list[float]] = {case: [] for case in CASES}
    inits: dict[str, list[float]] = {case: [] for case in CASES}
    for r in range(rounds):
        for case in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
            wall, in_calls, in_init = _job(ray, hub_ray, data, name, url, case, caches)
            walls[case].append(wall)
            calls[case].append(in_calls)
            inits[case].append(in_init)
            log(
                f"ray: {name} round {r + 1} {case}: {wall:.1f}s, {in_calls:.1f}s in calls, "
                f"{in_init:.1f}s in constructors"
            )
    for case in CASES:
        section.rows.append(
            [
                name,
                f"{n:,}",
                str(BATCH[name]),
                case,
                f"{statistics.median(walls[case]):.1f}",
                f"{n / statistics.median(walls[case]):,.0f}",
                _ratios(walls["Ray docs"], walls[case]),
                f"{n / statistics.median(calls[case]):,.0f}",
                _ratios(calls["Ray docs"], calls[case]),
                f"{statistics.median(inits[case]):.2f}",
            ]
        )
        section.data.setdefault(name, {})[case] = {
            "rows": n,
            "wall_seconds": walls[case],
            "seconds_in_calls": calls[case],
            "seconds_in_constructors": inits[case],
        }


def _job(
    ray: Any, hub_ray: Any, data: Any, name: str, url: str, case: str, caches: list[Path]
) -> tuple[float, float, float]:
    """Prepare ``case`` (untimed), run its map_batches job: (wall seconds, seconds in
    calls, seconds in the actors' constructors)."""
    compute = ray.data.ActorPoolStrategy(size=2)
    if case == "Ray docs":
        _on_each_node(ray, _download_into_node_models, url, name)
        fn: Any = TimedDocs
        kwargs: dict[str, Any] = {"name": name}
    else:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
        if case == "asynchub, warm":
            hub_ray.prefetch_on_nodes([url])
        fn = _timed_predictor()
        kwargs = {"handle": url, "keep_columns": False}
    started = time.perf_counter()
    out = data.map_batches(
        fn,
        fn_constructor_kwargs=kwargs,
        batch_size=BATCH[name],
        compute=compute,
        num_cpus=1,
    ).materialize()
    seconds = time.perf_counter() - started
    if out.count() != data.count() or set(out.columns()) != {"y", "t", "i"}:
        raise RuntimeError(f"{case}: unexpected output {out.schema()}")
    return seconds, float(out.sum("t")), float(out.sum("i"))


def _ratios(baseline: list[float], seconds: list[float]) -> str:
    """Median [min, max] of baseline ÷ case per round: the case's speed over the baseline's."""
    ratios = [b / s for b, s in zip(baseline, seconds, strict=True)]
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"


def _download_into_node_models(url: str, name: str) -> str:
    return _download_here(url, os.path.join(os.environ["BENCH_MODELS"], name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[f"{k}={v}" for k, v in DEFAULT_ROWS.items()],
        help="MODEL=N pairs (MLP, MobileNetV2)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rows = {k: int(v) for k, v in (item.split("=", 1) for item in args.rows)}
    unknown = set(rows) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; known: {sorted(SHAPES)}")
    started = time.time()
    section = run(rows, args.rounds)
    print(section.markdown())
    info = machine()
    print(
        f"`python -m benchmarks.bench_ray {' '.join(sys.argv[1:])}`: "
        f"{time.time() - started:.0f} s; {info.get('cpu')}, load average {os.getloadavg()}"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "data": section.data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
