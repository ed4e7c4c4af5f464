"""asynchub.ray on a real local Ray cluster of two nodes, started once for this file.

The two nodes run on this machine (``ray.cluster_utils.Cluster``), each with 2
logical CPUs and its own ``TFHUB_CACHE_DIR`` (the per-node cache); a test that
passes ``cache_dir=`` points both nodes at one directory, as nodes sharing a
network file system would. Modules come from a real HTTP server on 127.0.0.1,
which counts each GET. Actors ask for fractional CPUs so that all fit on 2 cores.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import anyio  # noqa: E402
import numpy as np  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import asynchub  # noqa: E402
import asynchub.ray as hub_ray  # noqa: E402
from asynchub import (  # noqa: E402
    HandleError,
    HTTPStatusError,
    HubError,
    PrefetchError,
    SignatureError,
)
from tests._archives import make_module, tar_bytes  # noqa: E402
from tests._httpserver import Server, running  # noqa: E402

pytestmark = [
    pytest.mark.tf,
    # Ray's and its dependencies' own chatter is not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def key(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()


@dataclass
class RayCluster:
    cluster: Cluster
    #: node id -> that node's own cache dir (its TFHUB_CACHE_DIR)
    caches: dict[str, Path]
    #: the dir the tests that share a cache point every node at
    shared: Path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    root = tmp_path_factory.mktemp("ray")
    node_caches = [root / "node0-cache", root / "node1-cache"]
    # Keep every Ray node, and all of Ray's own traffic, on 127.0.0.1: by default Ray
    # binds to the address of the machine's outward interface. This switch (named for
    # Windows and macOS) makes it use the loopback address; the workers inherit it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "env_vars": {"TFHUB_CACHE_DIR": str(node_caches[0])},
        },
    )
    try:
        cluster.add_node(num_cpus=2, env_vars={"TFHUB_CACHE_DIR": str(node_caches[1])})
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        caches = {node_id: Path(cache) for node_id, cache in ray.get(_node_caches(), timeout=60)}
        assert sorted(map(str, caches.values())) == sorted(map(str, node_caches))
        yield RayCluster(cluster, caches, root / "shared-cache")
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _node_caches() -> list[Any]:
    """One task per node: (node id, the TFHUB_CACHE_DIR its workers see)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), os.environ["TFHUB_CACHE_DIR"]

    return [
        where.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote()
        for node in ray.nodes()
        if node["Alive"]
    ]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running() as srv:
        yield srv


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A module-shaped archive (no TensorFlow graph): enough for prefetch."""
    return tar_bytes(make_module(tmp_path_factory.mktemp("mod") / "m", weights=50_000))


@pytest.fixture(scope="module")
def fruit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A real SavedModel (tests/_savedmodels.py's fruit module) and its tar.gz."""
    from tests._savedmodels import fruit_module

    root = tmp_path_factory.mktemp("fruit")
    module = fruit_module(root / "fruit")
    packed = asynchub.pack(module, root / "fruit.tar.gz")
    return module, packed.read_bytes()


def route(server: Server, body: bytes, **kwargs: Any) -> tuple[str, str]:
    """A fresh path on the server serving ``body``: (its URL, its path)."""
    path = f"/{uuid.uuid4().hex[:12]}/1"
    return server.add(path, body=body, **kwargs), path


# -- import ------------------------------------------------------------------------------


def test_import_asynchub_never_imports_ray() -> None:
    code = (
        "import sys, asynchub, asynchub.ray; "
        "print(*(m in sys.modules for m in ('ray', 'tensorflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- prefetch_on_nodes ---------------------------------------------------------------------


def test_shared_cache_fetches_each_module_once(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    (url1, path1), (url2, path2) = route(server, archive), route(server, archive)
    result = hub_ray.prefetch_on_nodes([url1, url2, url1], cache_dir=cluster.shared)
    assert set(result) == set(cluster.caches)
    expected = [str(cluster.shared / key(u)) for u in (url1, url2, url1)]
    assert all(paths == expected for paths in result.values())
    assert len(server.gets(path1)) == len(server.gets(path2)) == 1
    # Complete everywhere now: nothing is fetched again.
    hub_ray.prefetch_on_nodes([url1, url2], cache_dir=cluster.shared)
    assert len(server.gets(path1)) == len(server.gets(path2)) == 1
    assert not list(cluster.shared.glob("*.lock")) and not list(cluster.shared.glob("*.tmp"))


def test_per_node_caches_fetch_once_per_node(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    url, path = route(server, archive)
    result = hub_ray.prefetch_on_nodes([url, url])
    assert result == {node: [str(cache / key(url))] * 2 for node, cache in cluster.caches.items()}
    assert len(server.gets(path)) == len(cluster.caches) == 2
    for cache in cluster.caches.values():
        assert (cache / key(url) / "saved_model.pb").is_file()


def test_failures_are_reported_per_node_and_handle(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    good, _ = route(server, archive)
    missing = server.url(f"/{uuid.uuid4().hex[:12]}/missing")
    with pytest.raises(PrefetchError) as caught:
        hub_ray.prefetch_on_nodes([good, missing], cache_dir=cluster.shared)
    errors = caught.value.exceptions
    assert len(errors) == 2  # one per node, for the one failed handle
    assert "2 of 4 prefetches on 2 nodes failed" in str(caught.value)
    for node, error in zip(sorted(cluster.caches), sorted(errors, key=str), strict=True):
        assert isinstance(error, HTTPStatusError)
        assert error.status == 404 and error.handle == missing
        assert str(error).startswith(f"on node {node[:8]} (")
        assert missing in str(error)

    result = hub_ray.prefetch_on_nodes(
        [good, missing], cache_dir=cluster.shared, return_exceptions=True
    )
    assert set(result) == set(cluster.caches)
    for node, (path, error) in result.items():
        assert path == str(cluster.shared / key(good))
        assert isinstance(error, HTTPStatusError) and node[:8] in str(error)


def test_bad_options_fail_before_any_task(server: Server, archive: bytes) -> None:
    url, path = route(server, archive)
    with pytest.raises(TypeError):
        hub_ray.prefetch_on_nodes([url], cache_dri="/x")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_concurrency"):
        hub_ray.prefetch_on_nodes([url], max_concurrency=0)
    assert server.gets(path) == []


def test_a_node_whose_task_does_not_finish_fails_its_handles(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    url, _ = route(server, archive, delay=3.0)
    started = time.monotonic()
    result = hub_ray.prefetch_on_nodes([url], return_exceptions=True, task_timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert set(result) == set(cluster.caches)
    for node, (error,) in result.items():
        assert isinstance(error, HubError) and error.handle == url
        assert f"on node {node[:8]}" in str(error) and "did not finish within 0.5s" in str(error)
    # The tasks were cancelled, and cleaned up after themselves on their nodes.
    deadline = time.monotonic() + 10
    leftovers = [1]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [p for c in cluster.caches.values() for p in c.glob(f"{key(url)}.*")]
    assert leftovers == []
    assert not any((c / key(url)).exists() for c in cluster.caches.values())


# -- a cache shared across hosts: the lock protocol ---------------------------------------


def _foreign_lock(cache: Path, url: str, *, age: float) -> tuple[Path, Path]:
    """A lock held by a process on another host, with a download dir it wrote into."""
    cache.mkdir(parents=True, exist_ok=True)
    uid = uuid.uuid4().hex
    lock = cache / f"{key(url)}.lock"
    tmp = cache / f"{key(url)}.{uid}.tmp"
    (tmp / "variables").mkdir(parents=True)
    (tmp / "variables" / "variables.data-00000-of-00001").write_bytes(b"partial")
    lock.write_text(f"gpu-node-7.cluster.example.4242.{uid}")
    then = time.time() - age
    for path in (tmp / "variables" / "variables.data-00000-of-00001", tmp / "variables", tmp):
        os.utime(path, (then, then))
    os.utime(lock, (then, then))
    return lock, tmp


def test_idle_lock_from_another_host_is_taken_over(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    url, path = route(server, archive)
    cache = cluster.shared
    lock, tmp = _foreign_lock(cache, url, age=30.0)
    result = hub_ray.prefetch_on_nodes([url], cache_dir=cache, lock_stale_after=5.0)
    assert all(paths == [str(cache / key(url))] for paths in result.values())
    assert len(server.gets(path)) == 1  # one node took over, the other waited for it
    assert not lock.exists() and not tmp.exists()


def test_lock_from_another_host_is_waited_for_while_its_download_grows(
    cluster: RayCluster, server: Server, archive: bytes
) -> None:
    url, path = route(server, archive)
    cache = cluster.shared
    lock, tmp = _foreign_lock(cache, url, age=0.0)
    growing = threading.Event()
    growing.set()

    def grow() -> None:
        # The other host's download makes progress for 2 s, then its host dies.
        part = tmp / "variables" / "variables.data-00000-of-00001"
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and growing.is_set():
            with part.open("ab") as fh:
                fh.write(b"x" * 1024)
            time.sleep(0.2)

    grower = threading.Thread(target=grow, daemon=True)
    started = time.monotonic()
    grower.start()
    try:
        result = hub_ray.prefetch_on_nodes([url], cache_dir=cache, lock_stale_after=1.0)
    finally:
        growing.clear()
        grower.join()
    elapsed = time.monotonic() - started
    assert elapsed >= 2.0, "a lock whose download dir still grows was taken over"
    assert all(paths == [str(cache / key(url))] for paths in result.values())
    assert len(server.gets(path)) == 1
    assert not lock.exists() and not tmp.exists()


# -- Ray Data: Predictor ----------------------------------------------------------------

_LOADS = 0  # Predictors made in this process (a Ray actor's, when it runs in one)
_CALLS = 0  # batches they were given


class CountingPredictor(hub_ray.Predictor):
    """Predictor that reports, per row, which actor, node and module produced it."""

    def __init__(self, **kwargs: Any) -> None:
        global _LOADS
        super().__init__(**kwargs)
        _LOADS += 1
        self._node = ray.get_runtime_context().get_node_id()
        self._frozen = gc.get_freeze_count() if gc.isenabled() else -1

    def __call__(self, batch: Any) -> dict[str, Any]:
        global _CALLS
        out = super().__call__(batch)
        _CALLS += 1
        rows = len(out["y"])
        out["call"] = np.full(rows, _CALLS)
        out["pid"] = np.full(rows, os.getpid())
        out["loads"] = np.full(rows, _LOADS)
        out["module"] = np.full(rows, id(self.module))
        out["node"] = np.array([self._node] * rows)
        out["path"] = np.array([str(self.module.path)] * rows)
        out["frozen"] = np.full(rows, self._frozen)
        return out


def _rows(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return [{"i": i, "x": x[i]} for i in range(n)]


def test_map_batches_per_node_caches(
    cluster: RayCluster, server: Server, fruit: tuple[Path, bytes]
) -> None:
    module_dir, body = fruit
    url, path = route(server, body)
    rows = _rows(400)
    ds = ray.data.from_items(rows, override_num_blocks=16).map_batches(
        CountingPredictor,
        fn_constructor_kwargs={
            "handle": url,
            "signature": None,
            "input_column": "x",
            "output_column": "y",
        },
        batch_size=25,
        compute=ray.data.ActorPoolStrategy(size=3),
        num_cpus=0.5,
    )
    out = sorted(ds.take_all(), key=lambda row: row["i"])

    local = asynchub.load(module_dir)
    x = np.stack([row["x"] for row in rows])
    np.testing.assert_allclose(np.stack([row["y"] for row in out]), local(x).numpy())

    # Each actor loaded the module once, in its constructor, and applied it to each of
    # its batches.
    per_actor: dict[int, set[tuple[int, int]]] = {}
    calls: dict[int, set[int]] = {}
    for row in out:
        pid = int(row["pid"])
        per_actor.setdefault(pid, set()).add((int(row["loads"]), int(row["module"])))
        calls.setdefault(pid, set()).add(int(row["call"]))
    assert len(per_actor) >= 2
    assert all(len(seen) == 1 and next(iter(seen))[0] == 1 for seen in per_actor.values())
    assert max(len(c) for c in calls.values()) >= 2
    # In an actor, the Predictor froze what it had loaded (and the collector is back on).
    assert all(int(row["frozen"]) > 10_000 for row in out)

    # Each actor resolved through its node's cache; each node fetched the module once,
    # however many of the pool's 3 actors it runs (2 and 1, or 3 and 0).
    for row in out:
        assert row["path"] == str(cluster.caches[row["node"]] / key(url))
    fetched = [cache for cache in cluster.caches.values() if (cache / key(url)).is_dir()]
    assert len(server.gets(path)) == len(fetched) <= 2


def test_map_batches_dict_signature_shared_cache(
    cluster: RayCluster, server: Server, fruit: tuple[Path, bytes]
) -> None:
    module_dir, body = fruit
    url, path = route(server, body)
    rng = np.random.default_rng(1)
    a, o = rng.normal(size=(2, 300)).astype(np.float32)
    rows = [{"i": i, "a": a[i], "o": o[i]} for i in range(300)]
    ds = ray.data.from_items(rows, override_num_blocks=6).map_batches(
        hub_ray.Predictor,
        fn_constructor_kwargs={
            "handle": url,
            "signature": "fruit_to_pet",
            "input_column": {"apples": "a", "oranges": "o"},
            "output_column": {"cats": "c", "dogs": "d"},
            "cache_dir": str(cluster.shared),
        },
        batch_size=40,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
    )
    out = sorted(ds.take_all(), key=lambda row: row["i"])
    assert set(out[0]) == {"i", "a", "o", "c", "d"}

    expected = asynchub.load(module_dir)(
        {"apples": a, "oranges": o}, signature="fruit_to_pet", as_dict=True
    )
    np.testing.assert_allclose([row["c"] for row in out], expected["cats"].numpy())
    np.testing.assert_allclose([row["d"] for row in out], expected["dogs"].numpy())
    assert len(server.gets(path)) == 1  # two actors, two nodes, one shared cache


def test_predictor_checks_columns_against_the_signature(fruit: tuple[Path, bytes]) -> None:
    module_dir, _ = fruit
    handle = str(module_dir)
    with pytest.raises(SignatureError, match="takes 2 inputs"):
        hub_ray.Predictor(handle, signature="fruit_to_pet")
    with pytest.raises(SignatureError, match="missing: \\['oranges'\\]"):
        hub_ray.Predictor(handle, signature="fruit_to_pet", input_column={"apples": "a"})
    with pytest.raises(SignatureError, match="no output"):
        hub_ray.Predictor(
            handle,
            signature="fruit_to_pet",
            input_column={"apples": "a", "oranges": "o"},
            output_column={"birds": "b"},
        )
    with pytest.raises(SignatureError, match="no signature 'nope'"):
        hub_ray.Predictor(handle, signature="nope")


def test_predictor_applies_the_module_to_numpy_batches(fruit: tuple[Path, bytes]) -> None:
    module_dir, _ = fruit
    frozen = gc.get_freeze_count()
    predict = hub_ray.Predictor(str(module_dir))
    # Outside an actor, the process is not the Predictor's to freeze.
    assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = predict({"x": x, "id": np.arange(4)})
    np.testing.assert_allclose(out["y"], x * 2)
    np.testing.assert_array_equal(out["id"], np.arange(4))
    # float64 columns: the callable's traces take float32; the module converts.
    for _ in range(2):
        np.testing.assert_allclose(predict({"x": x.astype(np.float64)})["y"], x * 2)
    np.testing.assert_allclose(predict({"x": x})["y"], x * 2)

    default = hub_ray.Predictor(
        str(module_dir), signature="default", output_column={"default": "s"}, keep_columns=False
    )
    out2 = default({"x": x})
    assert set(out2) == {"s"}
    np.testing.assert_allclose(out2["s"], x.sum(axis=1) * 2)

    with pytest.raises(KeyError, match="no column 'x'; it has: features"):
        predict({"features": x})
    with pytest.raises(TypeError, match='batch_format="numpy"'):
        predict([x])  # type: ignore[arg-type]


def test_predictor_on_a_cache_hit_starts_no_event_loop(
    server: Server, fruit: tuple[Path, bytes], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every actor after a node's first (or after prefetch_on_nodes) finds the module in
    # the cache: that is answered in the actor's thread, without the hub's loop thread.
    from asynchub import _sync

    _, body = fruit
    url, _ = route(server, body)
    started: list[str] = []
    original = _sync._start_portal

    def spy(backend: str) -> Any:
        started.append(backend)
        return original(backend)

    monkeypatch.setattr(_sync, "_start_portal", spy)
    first = hub_ray.Predictor(url)  # downloads: through the event loop
    assert len(started) == 1
    second = hub_ray.Predictor(url)
    assert len(started) == 1
    assert second.module.path == first.module.path
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(second({"x": x})["y"], x * 2)


# -- Ray Serve: model_loader ---------------------------------------------------------------


def test_model_loader_refuses_ids_that_are_not_plain_names(
    server: Server, fruit: tuple[Path, bytes], cache_dir: Path
) -> None:
    _, body = fruit
    server.add("/serve/good-1.0_x/1", body=body)
    load = hub_ray.model_loader(server.url("/serve/{model_id}/1"))

    async def main() -> None:
        m = await load("good-1.0_x")
        assert isinstance(m, asynchub.Module)
        for bad in ("../secret", "a/b", "..", "", "x?y=1", "http://elsewhere", "a b"):
            with pytest.raises(HandleError, match="refused"):
                await load(bad)

    anyio.run(main)
    with pytest.raises(ValueError, match="model_id"):
        hub_ray.model_loader("https://example.com/models/latest")


def test_model_loader_with_an_allow_list(fruit: tuple[Path, bytes]) -> None:
    module_dir, _ = fruit
    load = hub_ray.model_loader({"fruit": module_dir})

    async def main() -> None:
        assert (await load("fruit")).path == module_dir
        with pytest.raises(HandleError, match="unknown model id 'veg'; known ids: fruit"):
            await load("veg")

    anyio.run(main)


def test_serve_multiplexed_with_request_batching(
    cluster: RayCluster, server: Server, fruit: tuple[Path, bytes]
) -> None:
    from ray import serve

    _, body = fruit
    prefix = f"/{uuid.uuid4().hex[:12]}"
    for model_id in ("a", "b"):
        server.add(f"{prefix}/{model_id}/1", body=body)

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Models:
        """The recipe of docs/scale-out.md: multiplexed loading, batched applying."""

        def __init__(self, template: str) -> None:
            load = hub_ray.model_loader(template)
            self.model = serve.multiplexed(max_num_models_per_replica=2)(load)

        async def __call__(self, x: np.ndarray) -> np.ndarray:
            m = await self.model(serve.get_multiplexed_model_id())
            y = await m.batched(max_batch_size=16, max_delay=0.005)(x)
            return y.numpy()  # type: ignore[no-any-return]

    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(
            Models.bind(server.url(prefix + "/{model_id}/1")),
            name="models",
            route_prefix=None,
        )
        requests = [
            (model_id, np.full((1, 3), i, np.float32))
            for i, model_id in enumerate(["a", "b", "a", "a", "b", "a"])
        ]
        responses = [
            handle.options(multiplexed_model_id=model_id).remote(x) for model_id, x in requests
        ]
        for (_, x), response in zip(requests, responses, strict=True):
            np.testing.assert_allclose(response.result(timeout_s=60), x * 2)
        bad = handle.options(multiplexed_model_id="../etc").remote(requests[0][1])
        with pytest.raises(Exception, match="refused"):
            bad.result(timeout_s=60)
    finally:
        serve.shutdown()
    # One replica, so one node's cache: each model fetched once.
    assert len(server.gets(f"{prefix}/a/1")) == len(server.gets(f"{prefix}/b/1")) == 1
