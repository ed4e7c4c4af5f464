"""``asynchub serve`` for operators: Prometheus metrics at ``/metrics``, and the drain on SIGTERM.

Servers are started as users start them (``python -m asynchub serve ROOT --infer``) on
127.0.0.1, called with ``tritonclient`` and httpx, scraped and parsed with
prometheus_client's own parser, and stopped with real signals.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from . import _savedmodels
from ._procs import ServeProcess, start_serve, stop_cleanly

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
http = pytest.importorskip("tritonclient.http")
aio = pytest.importorskip("tritonclient.http.aio")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)


# -- models, servers, scrapes -----------------------------------------------------------------


def sleepy_module(path: Path) -> Path:
    """``y = x`` on ``float32[?]``, after sleeping about ``max(x)`` seconds.

    It sleeps rather than computes, so its time does not depend on how busy the CPUs
    are. TensorFlow has no sleep op of its own; tf.data's test-only SleepDataset is one
    (it sleeps twice per element: hence the half).
    """
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops.testing import sleep

    def sleepy(x: Any) -> Any:
        microseconds = tf.cast(tf.maximum(tf.reduce_max(x), 0.0) * 0.5e6, tf.int64)
        ticks = tf.data.Dataset.range(1).apply(sleep(microseconds))
        total = ticks.reduce(tf.constant(0, tf.int64), lambda a, b: a + b)
        return {"y": x + 0.0 * tf.cast(total, tf.float32)}

    module = tf.Module()
    fn = tf.function(sleepy, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": fn.get_concrete_function()}
    )
    return path


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics``, parsed: (sample name, sorted labels) -> value."""
    answer = httpx.get(f"{base}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """A sample's value; 0 if it is not there (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _input(name: str, array: np.ndarray[Any, Any], binary: bool = True) -> Any:
    from tritonclient.utils import np_to_triton_dtype

    tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    return tensor.set_data_from_numpy(array, binary_data=binary)


def _status(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status())


# -- pure logic, no server --------------------------------------------------------------------


def test_route_kinds_and_outcomes() -> None:
    from asynchub._serving.ops import outcome, route_kind

    assert route_kind("/v2/models/m/versions/1/infer", b"", True) == "infer"
    assert route_kind("/v2/health/ready", b"", True) == "health"
    assert route_kind("/v2/models/m", b"", True) == "metadata"
    assert route_kind("/v2/models/m", b"", False) == "page"  # a module, without --infer
    assert route_kind("/m/1", b"tf-hub-format=compressed", True) == "download"
    assert route_kind("/m/1", b"", True) == "page"
    assert (route_kind("/", b"", True), route_kind("/metrics", b"", False)) == ("index", "metrics")
    assert [outcome(s) for s in (200, 400, 404, 503, 500)] == [
        "success",
        "client_error",
        "client_error",
        "overloaded",
        "error",
    ]


def test_histograms_and_hub_bytes_in_prometheus_terms() -> None:
    from asynchub._progress import ProgressEvent, ProgressKind
    from asynchub._serving.ops import Ops

    ops = Ops(infer=True)
    stats = ops.model("m", "1")
    for seconds in (0.0005, 0.003, 99.0):  # on a bound, between two, past the last
        stats.succeeded(seconds)
    for kind, done in [("downloading", 10), ("downloading", 25), ("retrying", 0)]:
        ops.hub_progress(ProgressEvent(ProgressKind(kind), "h", done=done))
    for kind, done in [("downloading", 5), ("extracting", 30), ("done", 0)]:
        ops.hub_progress(ProgressEvent(ProgressKind(kind), "h", done=done))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(ops.scrape().decode())
        for s in family.samples
    }
    name = "asynchub_inference_request_duration_seconds"
    labels = {"model": "m", "version": "1"}
    assert value(samples, f"{name}_bucket", **labels, le="0.0005") == 1
    assert value(samples, f"{name}_bucket", **labels, le="0.005") == 2
    assert value(samples, f"{name}_bucket", **labels, le="10.0") == 2
    assert value(samples, f"{name}_bucket", **labels, le="+Inf") == 3
    assert value(samples, f"{name}_count", **labels) == 3
    assert value(samples, f"{name}_sum", **labels) == pytest.approx(99.0035)
    # 25 bytes, then a retry that read 30 from the start: all of them were read.
    assert value(samples, "asynchub_hub_read_bytes_total") == 55


# -- metrics ----------------------------------------------------------------------------------


def _build_metrics_root(root: Path) -> None:
    from asynchub._pack import pack

    _savedmodels.fruit_module(root / "fruit" / "1")
    staged = _savedmodels.signatures_module(root.parent / "add10", ["serving_default"])
    pack(staged, root / "add" / "10.tar.gz")  # loaded through the hub: its bytes are counted
    sleepy_module(root / "sleepy" / "1")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "saved_model.pb").write_bytes(b"not a graph")


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    pytest.importorskip("tensorflow")
    base = tmp_path_factory.mktemp("metrics")
    root = base / "models"
    root.mkdir()
    server = start_serve(base, root, "--max-queue", "4", build=_build_metrics_root)
    try:
        yield server
    finally:
        stop_cleanly(server.proc, server.reader, server.log)


def test_metrics_count_what_tritonclient_did(metrics_server: ServeProcess) -> None:
    url, base = metrics_server.address, metrics_server.base
    before = scrape(base)
    # The process collectors are on the app's own registry.
    assert value(before, "process_cpu_seconds_total") > 0
    assert value(before, "asynchub_draining") == 0
    with http.InferenceServerClient(url, network_timeout=60.0) as client:
        for i in range(3):
            result = client.infer("fruit", [_input("x", X + i)])
            np.testing.assert_allclose(result.as_numpy("extra"), X + i + 1)
        assert _status(lambda: client.infer("fruit", [_input("x", X[:, :2])])) == "400"
        assert _status(lambda: client.infer("nope", [_input("x", X)])) == "404"
        assert _status(lambda: client.infer("broken", [_input("x", X)])) == "500"
        x = np.array([1.0, 2.0], np.float32)
        np.testing.assert_allclose(client.infer("add", [_input("x", x)]).as_numpy("output"), x)
    # Overload: max_queue is 4 rows; requests that find them waiting get 503 at once.
    statuses: list[str] = []

    async def overload() -> None:
        async with aio.InferenceServerClient(url, conn_timeout=120) as c:

            async def one() -> None:
                try:
                    await c.infer("sleepy", [_input("x", np.array([0.3], np.float32))])
                    statuses.append("200")
                except InferenceServerException as exc:
                    statuses.append(str(exc.status()))

            await c.infer("sleepy", [_input("x", np.zeros(1, np.float32))])  # loaded
            async with anyio.create_task_group() as tg:
                for _ in range(24):
                    tg.start_soon(one)

    anyio.run(overload)
    assert set(statuses) == {"200", "503"}, statuses
    # The module host: a download and a page.
    archive = httpx.get(f"{base}/fruit/1?tf-hub-format=compressed", timeout=30)
    assert archive.status_code == 200
    assert httpx.get(f"{base}/fruit/1", timeout=30).status_code == 200

    after = scrape(base)
    requests = "asynchub_inference_requests_total"
    fruit = {"model": "fruit", "version": "1"}
    assert value(after, requests, **fruit, outcome="success") == 3
    assert value(after, requests, **fruit, outcome="client_error") == 1
    # The version a request without one was answered by is the label.
    assert value(after, requests, model="add", version="10", outcome="success") == 1
    sleepy = {"model": "sleepy", "version": "1"}
    assert value(after, requests, **sleepy, outcome="success") == statuses.count("200") + 1
    assert value(after, requests, **sleepy, outcome="overloaded") == statuses.count("503")
    # A name no model has is not a label (clients choose names); the HTTP count has it.
    assert not any(name == requests and ("model", "nope") in labels for name, labels in after)
    http_requests = "asynchub_http_requests_total"
    assert value(after, http_requests, route="infer", code="404") == 1
    assert value(after, http_requests, route="infer", code="400") == 1
    assert value(after, http_requests, route="infer", code="500") == 1
    assert value(after, http_requests, route="infer", code="503") == statuses.count("503")
    assert value(after, http_requests, route="download", code="200") == 1
    assert value(after, http_requests, route="page", code="200") == 1
    assert value(after, http_requests, route="metrics", code="200") >= 1
    assert value(after, "asynchub_http_requests_in_flight") == 0
    # Batches: each of fruit's requests ran alone, 2 rows each.
    assert value(after, "asynchub_inference_batch_rows_count", **fruit) == 3
    assert value(after, "asynchub_inference_batch_rows_sum", **fruit) == 6
    assert value(after, "asynchub_inference_batch_requests_sum", **fruit) == 3
    assert value(after, "asynchub_inference_request_duration_seconds_count", **fruit) == 3
    assert value(after, "asynchub_inference_decode_duration_seconds_count", **fruit) == 3
    assert value(after, "asynchub_inference_encode_duration_seconds_count", **fruit) == 3
    assert value(after, "asynchub_inference_compute_duration_seconds_count", **fruit) == 3
    # The sleepy model's batches joined requests, and each took its ~0.3 s.
    batches = value(after, "asynchub_inference_batch_requests_count", **sleepy)
    joined = value(after, "asynchub_inference_batch_requests_sum", **sleepy)
    assert joined == statuses.count("200") + 1 and batches < joined
    compute = value(after, "asynchub_inference_compute_duration_seconds_sum", **sleepy)
    assert compute >= 0.25 * (batches - 1)
    assert value(after, "asynchub_inference_pending_rows", **sleepy) == 0
    assert value(after, "asynchub_inference_pending_rows", **fruit) == 0
    # Loads: how long each took, and the failure.
    assert value(after, "asynchub_model_load_duration_seconds", **fruit) > 0
    assert value(after, "asynchub_model_load_failures_total", model="broken", version="1") == 1
    # Bytes: the archive the hub extracted, and the one sent to the download client.
    assert (
        value(after, "asynchub_hub_read_bytes_total")
        == (metrics_server.root / "add" / "10.tar.gz").stat().st_size
    )
    assert value(after, "asynchub_download_sent_bytes_total") == len(archive.content)


def test_metrics_are_per_app_and_there_without_infer(tmp_path: Path) -> None:
    # Two apps in one process, each with its own registry (no "duplicated timeseries"),
    # and an app that only hosts modules counts its downloads.
    from asynchub.server import create_app

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"graph" * 1000)
    first, second = create_app(tmp_path), create_app(tmp_path)
    assert first.state.ops.registry is not second.state.ops.registry

    async def main() -> tuple[int, str]:
        transport = httpx.ASGITransport(app=first)
        async with (
            first.router.lifespan_context(first),
            httpx.AsyncClient(transport=transport, base_url="http://test") as web,
        ):
            archive = await web.get("/m/1?tf-hub-format=compressed")
            assert archive.status_code == 200
            assert (await web.get("/nope/1?tf-hub-format=compressed")).status_code == 404
            assert (await web.post("/metrics")).status_code == 405
            metrics = await web.get("/metrics")
            assert metrics.status_code == 200
            return len(archive.content), metrics.text

    size, text = anyio.run(main)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert value(samples, "asynchub_download_sent_bytes_total") == size
    assert value(samples, "asynchub_http_requests_total", route="download", code="200") == 1
    assert value(samples, "asynchub_http_requests_total", route="download", code="404") == 1
    assert value(samples, "asynchub_http_requests_total", route="metrics", code="405") == 1
    assert not any(name.startswith("asynchub_inference") for name, _ in samples)


# -- the drain --------------------------------------------------------------------------------


def _fire(url: str, seconds: list[float], results: dict[int, Any]) -> threading.Thread:
    """Send one request per entry of ``seconds`` (each sleeps that long) from a thread."""

    async def main() -> None:
        async with aio.InferenceServerClient(url, conn_timeout=120) as c:

            async def one(i: int, x: float) -> None:
                try:
                    result = await c.infer("sleepy", [_input("x", np.array([x], np.float32))])
                    results[i] = (time.monotonic(), result.as_numpy("y"))
                except Exception as exc:
                    results[i] = (time.monotonic(), exc)

            async with anyio.create_task_group() as tg:
                for i, x in enumerate(seconds):
                    tg.start_soon(one, i, x)

    thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    thread.start()
    return thread


def _wait_in_flight(base: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while value(scrape(base), "asynchub_http_requests_in_flight") < count:
        assert time.monotonic() < deadline, "the requests never got in flight"
        time.sleep(0.02)


def _finish(server: ServeProcess) -> None:
    """Kill the server if the test left it running; close its pipe."""
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()
    server.reader.join(10)
    if server.proc.stderr is not None:
        server.proc.stderr.close()


def _warm(server: ServeProcess) -> None:
    with http.InferenceServerClient(server.address, network_timeout=60.0) as client:
        client.infer("sleepy", [_input("x", np.zeros(1, np.float32))])  # loads it


@pytest.fixture
def drain_root(tmp_path: Path) -> Path:
    pytest.importorskip("tensorflow")
    root = tmp_path / "models"
    sleepy_module(root / "sleepy" / "1")
    _savedmodels.signatures_module(root / "add" / "2", ["serving_default"])
    return root


def test_sigterm_drains_then_exits_0(tmp_path: Path, drain_root: Path) -> None:
    server = start_serve(tmp_path, drain_root, "--drain-timeout", "20")
    try:
        _warm(server)
        results: dict[int, Any] = {}
        seconds = [1.0, 1.01, 1.02, 1.03]
        fired = _fire(server.address, seconds, results)
        _wait_in_flight(server.base, len(seconds))
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # A new connection is still accepted, and refused in the protocol's shape.
        with httpx.Client(base_url=server.base, timeout=30) as web:
            deadline = time.monotonic() + 5
            while (ready := web.get("/v2/health/ready")).status_code == 200:
                assert time.monotonic() < deadline, "readiness never turned false"
                time.sleep(0.01)
            refused_at = time.monotonic()
            assert ready.status_code == 503 and ready.json() == {"ready": False}
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}
            late = web.post("/v2/models/add/infer", json=body)
            assert late.status_code == 503, late.text
            assert late.headers["retry-after"] == "1"
            assert "shutting down" in late.json()["error"]
            download = web.get("/add/2?tf-hub-format=compressed")
            assert download.status_code == 503 and download.headers["retry-after"] == "1"
            assert web.get("/v2/health/live").status_code == 200
            assert value(scrape(server.base), "asynchub_draining") == 1
        fired.join(60)
        status = server.proc.wait(30)
        exited = time.monotonic()
    finally:
        _finish(server)
    log = "".join(server.log)
    assert len(results) == len(seconds)
    for i, x in enumerate(seconds):
        _, y = results[i]
        assert isinstance(y, np.ndarray), (y, log)
        np.testing.assert_allclose(y, [x])
    last = max(done for done, _ in results.values())
    print(
        f"\ntimeline (s after SIGTERM): 503 on a new connection {refused_at - signalled:.3f}, "
        f"last in-flight answered {last - signalled:.3f}, exit {exited - signalled:.3f}"
    )
    assert status == 0, log
    assert last <= exited and exited - signalled < 20
    assert "draining: 4 request(s) in flight" in log and "drained in" in log, log


def test_drain_timeout_cuts_off_and_exits_1(tmp_path: Path, drain_root: Path) -> None:
    # A request longer than --drain-timeout: the server waits the bound, no longer (not
    # the request's 10 s), and exits 1 to say that requests were lost.
    server = start_serve(tmp_path, drain_root, "--drain-timeout", "1")
    try:
        _warm(server)
        results: dict[int, Any] = {}
        fired = _fire(server.address, [10.0], results)
        _wait_in_flight(server.base, 1)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(30)
        exited = time.monotonic()
        fired.join(30)
    finally:
        _finish(server)
    log = "".join(server.log)
    print(f"\ntimeline: exit {exited - signalled:.3f} s after SIGTERM (drain timeout 1 s)")
    assert status == 1, log
    assert 1 <= exited - signalled < 6, log
    assert "drain timeout (1 s): 1 request(s) still in flight are cut off" in log
    assert not isinstance(results[0][1], np.ndarray)  # it got no answer


def test_a_second_signal_stops_at_once(tmp_path: Path, drain_root: Path) -> None:
    server = start_serve(tmp_path, drain_root, "--drain-timeout", "60")
    try:
        _warm(server)
        results: dict[int, Any] = {}
        fired = _fire(server.address, [10.0], results)
        _wait_in_flight(server.base, 1)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        status = server.proc.wait(30)
        exited = time.monotonic()
        fired.join(30)
    finally:
        _finish(server)
    assert status == 128 + signal.SIGINT, "".join(server.log)
    assert exited - signalled < 5
