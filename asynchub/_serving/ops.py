"""Operating a server: Prometheus metrics at ``/metrics``, and the drain's refusals.

:class:`Ops` is one app's state: its metrics, whether the app is draining, and how
many requests are in flight. :class:`OpsMiddleware` wraps the app: it answers
``/metrics``, counts every request by route and status, the bytes sent to download
clients and the requests in flight, and, once the app drains, refuses new requests
with 503 (``drain.py`` runs the drain on SIGTERM). :class:`ModelStats` holds one
model version's numbers, which ``infer.py`` feeds: per request, per batch, per load.

The hot path only adds to plain ints and lists (``_Histogram``): prometheus_client's
own metric objects take a lock per update, and a request's updates cost 8-12 µs with
them against 1.5-2.5 µs this way (measured on 2 busy cores). Every update happens on
the event loop, as the scrape does, so nothing here needs a lock but the hub's byte
count (its progress events may come from worker threads). At scrape time a collector
turns the numbers into metric families on the app's own registry (not
prometheus_client's global one: a process may hold several apps, and tests do), next
to the process collectors.

The names follow Prometheus's conventions (an ``asynchub_`` prefix, seconds,
``_total`` counters) and mirror Triton's and KServe's sets: docs/serving.md, Metrics,
has the table.
"""

from __future__ import annotations

import json
import threading
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any, Final

from .._progress import ProgressEvent, ProgressKind
from ..errors import MissingDependencyError

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - exercised without the server extra only
    raise MissingDependencyError(
        f'serving modules needs the server extra ({exc}): pip install "asynchub[server]"'
    ) from exc

__all__ = ["METRICS_PATH", "ModelStats", "Ops", "OpsMiddleware"]

METRICS_PATH: Final = "/metrics"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Requests take from a fraction of a millisecond (a small model, batched) to seconds.
_LATENCY: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Decoding and encoding a request's tensors: microseconds, unless they are big.
_CODEC: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1)
_SIZES: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: A request's outcome, by the status it was answered with.
SUCCESS, CLIENT_ERROR, OVERLOADED, SERVER_ERROR = "success", "client_error", "overloaded", "error"
_OUTCOMES: Final = (SUCCESS, CLIENT_ERROR, OVERLOADED, SERVER_ERROR)

#: Paths that still answer while the app drains: a probe must see the server alive,
#: and a scrape its last numbers.
_LIVE: Final = "/v2/health/live"
_READY: Final = "/v2/health/ready"
_DRAIN_RETRY_AFTER: Final = "1"
_DRAIN_MESSAGE: Final = (
    "the server is shutting down and takes no new requests; send this one to another "
    "replica, or retry once this one has restarted"
)


def outcome(status: int) -> str:
    """The ``outcome`` label of an inference request answered with ``status``."""
    if status < 400:
        return SUCCESS
    if status == 503:
        return OVERLOADED
    return CLIENT_ERROR if status < 500 else SERVER_ERROR


def route_kind(path: str, query: bytes, infer: bool) -> str:
    """The ``route`` label of a request: what it asked for, in a few fixed kinds.

    Kinds, not paths: a label per module or client-chosen path would grow without bound.
    """
    if infer and path.startswith("/v2"):
        if path.endswith("/infer"):
            return "infer"
        return "health" if path.startswith("/v2/health/") else "metadata"
    if path == "/":
        return "index"
    if path == METRICS_PATH:
        return "metrics"
    return "download" if b"tf-hub-format" in query else "page"


class _Histogram:
    """A Prometheus histogram's counts, kept in a list: one bisect and two adds per value."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as HistogramMetricFamily takes them."""
        pairs, running = [], 0
        for bound, count in zip(
            (*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True
        ):
            running += count
            pairs.append((bound, float(running)))
        return pairs


class ModelStats:
    """One model version's numbers: its requests by outcome, its latencies and batches."""

    __slots__ = (
        "batch_requests",
        "batch_rows",
        "compute",
        "decode",
        "duration",
        "encode",
        "outcomes",
        "pending",
        "queue",
    )

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(_OUTCOMES, 0)
        self.duration = _Histogram(_LATENCY)
        self.decode = _Histogram(_CODEC)
        self.encode = _Histogram(_CODEC)
        self.queue = _Histogram(_LATENCY)
        self.compute = _Histogram(_LATENCY)
        self.batch_rows = _Histogram(_SIZES)
        self.batch_requests = _Histogram(_SIZES)
        self.pending = 0  # rows admitted and not yet answered

    def succeeded(self, seconds: float) -> None:
        self.outcomes[SUCCESS] += 1
        self.duration.observe(seconds)

    def failed(self, status: int) -> None:
        self.outcomes[outcome(status)] += 1

    def batch(self, requests: int, rows: int, queue_seconds: float, compute_seconds: float) -> None:
        """A batch ran (``Batched.observer``'s signature; called on the event loop)."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.queue.observe(queue_seconds)
        self.compute.observe(compute_seconds)


#: The model histograms: (ModelStats attribute, metric name, help).
_MODEL_HISTOGRAMS: Final = (
    (
        "duration",
        "asynchub_inference_request_duration_seconds",
        "Time from a request's arrival to its answer, successful requests.",
    ),
    (
        "decode",
        "asynchub_inference_decode_duration_seconds",
        "Time decoding a request's body into its input arrays and checking them.",
    ),
    ("encode", "asynchub_inference_encode_duration_seconds", "Time encoding an answer's outputs."),
    (
        "queue",
        "asynchub_inference_queue_duration_seconds",
        "Per batch, how long its oldest request waited before the batch ran.",
    ),
    (
        "compute",
        "asynchub_inference_compute_duration_seconds",
        "Per batch, how long the model ran on it (in a worker thread).",
    ),
    (
        "batch_rows",
        "asynchub_inference_batch_rows",
        "Rows per call of a model (the batch size); _count is the calls, _sum the rows.",
    ),
    (
        "batch_requests",
        "asynchub_inference_batch_requests",
        "Requests joined into one call of a model.",
    ),
)


class Ops:
    """One app's metrics and drain state (``app.state.ops``)."""

    def __init__(self, *, infer: bool) -> None:
        self.infer = infer
        self.draining = False
        self.in_flight = 0  # requests being answered, /metrics aside
        self.http: dict[tuple[str, int], int] = {}  # (route, status) -> requests
        self.download_sent_bytes = 0
        self.hub_read_bytes = 0
        self._hub_seen: dict[str, int] = {}
        self._hub_lock = threading.Lock()
        self.models: dict[tuple[str, str], ModelStats] = {}
        self.load_seconds: dict[tuple[str, str], float] = {}
        self.load_failures: dict[tuple[str, str], int] = {}
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(self)  # collect() below

    # -- hooks --------------------------------------------------------------------------------

    def model(self, name: str, version: str) -> ModelStats:
        """The numbers of a model version, made when it is loaded."""
        stats = self.models.get((name, version))
        if stats is None:
            stats = self.models[(name, version)] = ModelStats()
        return stats

    def loaded(self, name: str, version: str, seconds: float) -> None:
        self.load_seconds[(name, version)] = seconds

    def load_failed(self, name: str, version: str) -> None:
        self.load_failures[(name, version)] = self.load_failures.get((name, version), 0) + 1

    def hub_progress(self, event: ProgressEvent) -> None:
        """The server hub's progress callback: counts the archive bytes it reads.

        ``done`` is a running total per handle; the count gets what is new in each event.
        """
        kind = event.kind
        with self._hub_lock:
            if kind is ProgressKind.DOWNLOADING or kind is ProgressKind.EXTRACTING:
                seen = self._hub_seen.get(event.handle, 0)
                if event.done > seen:
                    self._hub_seen[event.handle] = event.done
                    self.hub_read_bytes += event.done - seen
            elif kind in (ProgressKind.DONE, ProgressKind.FAILED, ProgressKind.RETRYING):
                # A retry starts from zero again (or from where it resumes, which its
                # next event says); the bytes read so far stay counted: they were read.
                self._hub_seen.pop(event.handle, None)

    # -- the scrape ---------------------------------------------------------------------------

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """The metric families, from the numbers as they are now (prometheus_client's
        custom collector protocol)."""
        http = CounterMetricFamily(
            "asynchub_http_requests",
            "HTTP requests answered, by route kind (infer, health, metadata, download, "
            "page, index, metrics) and status code.",
            labels=("route", "code"),
        )
        for (route, status), count in sorted(self.http.items()):
            http.add_metric((route, str(status)), count)
        yield http
        yield GaugeMetricFamily(
            "asynchub_http_requests_in_flight",
            "HTTP requests being answered now (/metrics not counted).",
            value=self.in_flight,
        )
        yield GaugeMetricFamily(
            "asynchub_draining",
            "1 while the server drains before it stops (SIGTERM), else 0.",
            value=float(self.draining),
        )
        yield CounterMetricFamily(
            "asynchub_download_sent_bytes",
            "Bytes of module archives sent to download clients.",
            value=self.download_sent_bytes,
        )
        if not self.infer:
            return
        yield CounterMetricFamily(
            "asynchub_hub_read_bytes",
            "Bytes of archives (compressed) the server's hub read to extract models into "
            "its cache.",
            value=self.hub_read_bytes,
        )
        models = sorted(self.models.items())
        requests = CounterMetricFamily(
            "asynchub_inference_requests",
            "Inference requests a model version answered, by outcome: success, "
            "client_error (4xx), overloaded (503) or error (5xx).",
            labels=("model", "version", "outcome"),
        )
        pending = GaugeMetricFamily(
            "asynchub_inference_pending_rows",
            "Rows of requests admitted for a model version and not yet answered "
            "(waiting for a batch, or in one).",
            labels=("model", "version"),
        )
        for key, stats in models:
            for kind, count in stats.outcomes.items():
                requests.add_metric((*key, kind), count)
            pending.add_metric(key, stats.pending)
        yield requests
        yield pending
        for attribute, name, documentation in _MODEL_HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=("model", "version"))
            for key, stats in models:
                histogram: _Histogram = getattr(stats, attribute)
                family.add_metric(key, histogram.buckets(), histogram.total)
            yield family
        loads = GaugeMetricFamily(
            "asynchub_model_load_duration_seconds",
            "How long a model version took to load (extracting its archive included).",
            labels=("model", "version"),
        )
        for key, seconds in sorted(self.load_seconds.items()):
            loads.add_metric(key, seconds)
        yield loads
        failures = CounterMetricFamily(
            "asynchub_model_load_failures",
            "Loads of a model version that failed (the server's log says why).",
            labels=("model", "version"),
        )
        for key, count in sorted(self.load_failures.items()):
            failures.add_metric(key, count)
        yield failures


class OpsMiddleware:
    """ASGI middleware: ``/metrics``, request counts, and 503 for new requests while draining."""

    def __init__(self, app: ASGIApp, ops: Ops) -> None:
        self.app = app
        self.ops = ops

    def _count(self, route: str, status: int) -> None:
        counts, key = self.ops.http, (route, status)
        counts[key] = counts.get(key, 0) + 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ops = self.ops
        path: str = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root) :]
        route = route_kind(path, scope["query_string"], ops.infer)
        if route == "metrics":
            await self._metrics(scope, send)
            return
        if ops.draining and path != _LIVE:
            await self._refuse(route, path, send)
            return
        status = 500  # if the app fails before it answers
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and status < 300:  # archive bytes, not errors
                sent += len(message.get("body", b""))
            await send(message)

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        ops.in_flight += 1
        try:
            await self.app(scope, receive, counting_send if route == "download" else status_send)
        finally:
            ops.in_flight -= 1
            self._count(route, status)
            ops.download_sent_bytes += sent

    async def _metrics(self, scope: Scope, send: Send) -> None:
        if scope["method"] != "GET":
            await _answer(send, 405, b"/metrics takes GET\n", b"text/plain; charset=utf-8")
            self._count("metrics", 405)
            return
        body = self.ops.scrape()
        await _answer(send, 200, body, CONTENT_TYPE_LATEST.encode())
        self._count("metrics", 200)

    async def _refuse(self, route: str, path: str, send: Send) -> None:
        """Answer 503 in the protocol's shape: JSON under /v2, plain text elsewhere."""
        headers = [(b"retry-after", _DRAIN_RETRY_AFTER.encode()), (b"connection", b"close")]
        if path == _READY:
            body, media = b'{"ready":false}', b"application/json"
        elif route in ("infer", "health", "metadata"):
            body, media = json.dumps({"error": _DRAIN_MESSAGE}).encode(), b"application/json"
        else:
            body, media = (
                (_DRAIN_MESSAGE[0].upper() + _DRAIN_MESSAGE[1:] + ".\n").encode(),
                (b"text/plain; charset=utf-8"),
            )
        await _answer(send, 503, body, media, headers)
        self._count(route, 503)


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    media: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
