"""Predictions over the Open Inference Protocol (KServe v2, REST) for ``asynchub serve --infer``.

The protocol's HTTP/REST API, with its binary tensor data extension, so that
``tritonclient``, KServe's and MLServer's clients work unchanged:

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``: server metadata and health.
- ``GET /v2/models/NAME[/versions/V]``: the inputs and outputs of the signature served.
- ``GET /v2/models/NAME[/versions/V]/ready``: 200 once the model is loaded (this loads it).
- ``POST /v2/models/NAME[/versions/V]/infer``: JSON tensors, or binary ones after the JSON
  header (``Inference-Header-Content-Length``), both ways.

Model ``NAME`` version ``V`` is the module ``ROOT/NAME/V`` (directory or ``.tar.gz``,
found as ``asynchub serve`` finds them); without a version, the highest. Modules are
loaded on first use, through the hub's cache (an archive is extracted once), one load
per model however many requests ask at once. Requests run the module's default
signature, or the one their ``parameters.signature`` names, micro-batched per model
and signature with :meth:`Module.batched`. A request's inputs stay the numpy arrays
they were decoded into; a batch of them is joined with one ``np.concatenate`` and
converted once in a worker thread, and its outputs come back as numpy, one
``.numpy()`` per batch cut into views, which the answers are encoded from. TensorFlow
never runs on the event loop.

The protocol's codec (paths, decoding requests, binding them to a signature, encoding
responses) is plain functions in ``oip.py``; :class:`Inference` here holds the models and
the routes.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._batching import in_thread
from .._module import Module, SignatureInfo, default_signature, load_module
from .._version import __version__
from ..errors import HubError, ProtocolError, QueueFullError, SignatureError
from .oip import (
    bind,
    decode_request,
    describe_tensor,
    encode_response,
    inflate,
    parse_model_path,
)
from .options import InferOptions
from .repository import ModuleSource, latest, locate, scan, versions

if TYPE_CHECKING:  # ops hook
    from .ops import ModelStats, Ops

__all__ = ["Inference"]

logger = logging.getLogger("asynchub.server")

#: A JSON part bigger than this is parsed (and outputs with more values than
#: _OFFLOAD_VALUES are encoded) in a worker thread, so one big request does not stall
#: the event loop for the others.
_OFFLOAD_BYTES: Final = 256 << 10
_OFFLOAD_VALUES: Final = 1 << 16
#: Seconds a name's latest version is remembered before the directory is listed again.
_LATEST_TTL: Final = 2.0
_MEMO_LIMIT: Final = 1024
_PLATFORM: Final = "tensorflow_savedmodel"
_EXTENSIONS: Final = ("binary_tensor_data",)
_HEADER_LENGTH: Final = "inference-header-content-length"


# -- the models -------------------------------------------------------------------------------

#: Applies a signature to one request (a lone numpy array for a single input, else a
#: dict of them); returns each output as a numpy array.
Apply = Callable[[Any], Awaitable[dict[str, Any]]]


class _Model:
    """A loaded model version, and how each of its signatures is applied."""

    def __init__(
        self,
        source: ModuleSource,
        module: Module,
        options: InferOptions,
        stats: ModelStats | None = None,  # ops hook: its metrics
    ) -> None:
        self.source = source
        self.module = module
        self.options = options
        self.stats = stats
        self.label = f"model {source.name!r} version {source.version!r}"
        self._apply: dict[str, Apply] = {}
        self._in_flight = 0  # rows of unbatched requests admitted and not yet answered
        names = sorted(module.signatures)
        try:
            self._default: str | None = default_signature(names, handle=self.label)
        except SignatureError:
            self._default = None

    def signature(self, name: str | None) -> SignatureInfo:
        """The signature ``name``, or the default one; raises ``ProtocolError`` (400)."""
        name = self._default if name is None else name
        info = None if name is None else self.module.signatures.get(name)
        if info is None:
            names = ", ".join(sorted(self.module.signatures)) or "none"
            if name is None:
                raise ProtocolError(
                    400,
                    f"{self.label} has no default signature; name one in parameters.signature: "
                    f"{names}",
                )
            raise ProtocolError(400, f"{self.label} has no signature {name!r}; it has: {names}")
        return info

    def applier(self, signature: str) -> Apply:
        apply = self._apply.get(signature)
        if apply is None:
            apply = self._apply[signature] = self._make(signature)
        return apply

    def _make(self, signature: str) -> Apply:
        options = self.options
        if options.batching:
            try:
                batched = self.module.batched(
                    signature,
                    max_batch_size=options.max_batch_size,
                    max_delay=options.max_delay,
                    max_queue=options.max_queue,
                    as_dict=True,
                    as_numpy=True,
                )
                if self.stats is not None:  # ops hook
                    batched.observer = self.stats.batch
                apply: Apply = batched
                return apply
            except SignatureError as exc:  # e.g. an input without a batch dimension
                logger.info(
                    "%s, signature %r: requests run one by one: %s", self.label, signature, exc
                )
        module, limit, stats = self.module, options.max_queue, self.stats

        def call(inputs: Any) -> tuple[dict[str, Any], float, float]:
            began = time.monotonic()  # ops hook: when it ran, for the metrics
            result = module(inputs, signature=signature, as_dict=True)
            return {name: value.numpy() for name, value in result.items()}, began, time.monotonic()

        async def unbatched(inputs: Any) -> dict[str, Any]:
            first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            if limit is not None and self._in_flight >= limit:
                raise QueueFullError(
                    f"{self.label}: {self._in_flight} rows are already in flight "
                    f"(max_queue={limit}); the model is overloaded, try again later",
                    handle=module.handle,
                )
            self._in_flight += rows
            arrival = time.monotonic()
            try:
                result, began, ended = await in_thread(module, call, inputs)
            finally:
                self._in_flight -= rows
            if stats is not None:  # ops hook: each request is a batch of its own
                stats.batch(1, rows, began - arrival, ended - began)
            return result

        return unbatched

    def metadata(self, signature: str | None, all_versions: list[str]) -> dict[str, Any]:
        names = sorted(self.module.signatures)
        try:
            info: SignatureInfo | None = self.signature(signature)
        except ProtocolError:
            if signature is not None:
                raise
            info = None  # no default: say which signatures there are
        return {
            "name": self.source.name,
            "versions": all_versions,
            "platform": _PLATFORM,
            "inputs": [describe_tensor(t) for t in info.inputs] if info else [],
            "outputs": [describe_tensor(t) for t in info.outputs] if info else [],
            "parameters": {"signature": info.name if info else None, "signatures": names},
        }


@dataclass
class _Flight:
    done: anyio.Event
    model: _Model | None = None
    error: BaseException | None = None


class Inference:
    """The models under ROOT, loaded on demand, and the ``/v2`` routes that serve them."""

    def __init__(self, root: Path, options: InferOptions) -> None:
        self.root = root
        self.options = options
        self._loaded: dict[tuple[str, str], _Model] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._latest: dict[str, tuple[float, str | None]] = {}
        self._listing: set[str] = set()  # names whose versions are being listed now
        self._hub: Any = None
        self._hub_lock = anyio.Lock()
        # Loading is heavy and rare: one at a time, on a thread of its own.
        self._load_threads = anyio.CapacityLimiter(1)
        # Parsing and encoding big bodies (the GIL is held; it only keeps the loop turning).
        self._codec_threads = anyio.CapacityLimiter(2)
        self.ops: Ops | None = None  # ops hook: the app's metrics, set by create_app

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Import TensorFlow (so the first request does not wait for it), then load every
        model version under ROOT if the options say ``preload``."""
        from .._tf import import_tensorflow

        await anyio.to_thread.run_sync(import_tensorflow, limiter=self._load_threads)
        if not self.options.preload:
            return
        for source in await anyio.to_thread.run_sync(scan, self.root):
            try:
                await self._load((source.name, source.version))
            except ProtocolError as exc:  # logged; requests for it answer with the error
                logger.error("preloading %s/%s failed: %s", source.name, source.version, exc)

    async def close(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            await hub.aclose()

    # -- models -------------------------------------------------------------------------------

    async def model(self, name: str, version: str | None) -> _Model:
        """The loaded model ``name`` (at ``version``, else the latest); loads it on first use.

        Raises :class:`ProtocolError`: 404 for an unknown model or version, 500 if it
        cannot be loaded (the log says why).
        """
        if version is None:
            version = await self._latest_version(name)
        model = self._loaded.get((name, version))
        if model is None:
            model = await self._load((name, version))
        return model

    async def _latest_version(self, name: str) -> str:
        now = time.monotonic()
        memo = self._latest.get(name)
        # One request lists the versions again when the memo expires; the others go on
        # with what it said until then.
        if memo is not None and (memo[0] > now or name in self._listing):
            version = memo[1]
        else:
            self._listing.add(name)
            try:
                found = await anyio.to_thread.run_sync(versions, self.root, name)
            finally:
                self._listing.discard(name)
            version = latest(found)
            if len(self._latest) >= _MEMO_LIMIT:
                self._latest.clear()
            self._latest[name] = (time.monotonic() + _LATEST_TTL, version)
        if version is None:
            raise ProtocolError(404, f"there is no model {name!r} here")
        return version

    async def _load(self, key: tuple[str, str]) -> _Model:
        model = self._loaded.get(key)
        if model is not None:
            return model
        flight = self._flights.get(key)
        if flight is None:
            # The first request loads the model; the others wait for the same load.
            flight = self._flights[key] = _Flight(anyio.Event())
            try:
                # Shielded: the waiters need the result even if the first caller leaves.
                with anyio.CancelScope(shield=True):
                    flight.model = await self._load_now(*key)
            except Exception as exc:
                flight.error = exc
            finally:
                del self._flights[key]
                flight.done.set()
        else:
            await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.model is None:  # pragma: no cover - the loader died of a BaseException
            raise ProtocolError(500, f"model {key[0]!r} version {key[1]!r} failed to load")
        return flight.model

    async def _load_now(self, name: str, version: str) -> _Model:
        source = await anyio.to_thread.run_sync(locate, self.root, name, version)
        if source is None:
            found = await anyio.to_thread.run_sync(versions, self.root, name)
            if not found:
                raise ProtocolError(404, f"there is no model {name!r} here")
            raise ProtocolError(
                404,
                f"model {name!r} has no version {version!r}; it has: "
                f"{', '.join(s.version for s in found)}",
            )
        started = time.perf_counter()
        try:
            hub = await self._open_hub()
            # Through the hub: an archive is extracted into the cache once, a directory
            # is used in place.
            path = await hub.resolve(str(source.path))
            module = await anyio.to_thread.run_sync(
                self._load_blocking, path, str(source.path), limiter=self._load_threads
            )
        except HubError as exc:
            if self.ops is not None:  # ops hook
                self.ops.load_failed(name, version)
            # The details (paths on this machine) go to the log, not to the client.
            logger.error("cannot load model %s version %s: %s", name, version, exc)
            raise ProtocolError(
                500,
                f"model {name!r} version {version!r} cannot be loaded; the server's log says why",
            ) from exc
        seconds = time.perf_counter() - started
        stats = None
        if self.ops is not None:  # ops hook
            self.ops.loaded(name, version, seconds)
            stats = self.ops.model(name, version)
        model = _Model(source, module, self.options, stats)
        self._loaded[(name, version)] = model
        logger.info(
            "loaded model %s version %s from %s in %.2f s",
            name,
            version,
            source.path,
            seconds,
        )
        return model

    @staticmethod
    def _load_blocking(path: Path, handle: str) -> Module:
        module = load_module(path, handle=handle)
        # A full collection in a process holding TensorFlow pauses for ~200 ms: move what
        # is alive now out of the collector's reach, as a server should after loading.
        gc.collect()
        gc.freeze()
        return module

    async def _open_hub(self) -> Any:
        async with self._hub_lock:
            if self._hub is None:
                from .._hub import AsyncHub

                # ops hook: the progress callback counts the archive bytes read.
                hub = AsyncHub(progress=self.ops.hub_progress if self.ops is not None else None)
                await hub.__aenter__()
                self._hub = hub
        return self._hub

    # -- requests -----------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: Request) -> Response:
        arrival = time.perf_counter()
        model = await self.model(name, version)
        stats = model.stats
        if stats is None:
            return await self._infer(model, request, None)
        # ops hook: each request a model answers is counted by its outcome.
        try:
            response = await self._infer(model, request, stats)
        except ProtocolError as exc:
            stats.failed(exc.status)
            raise
        except Exception:
            stats.failed(500)
            raise
        stats.succeeded(time.perf_counter() - arrival)
        return response

    async def _infer(self, model: _Model, request: Request, stats: ModelStats | None) -> Response:
        started = time.perf_counter()  # ops hook
        body = await request.body()
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            body = await self._codec(len(body) > _OFFLOAD_BYTES, inflate, body, encoding)
        header = request.headers.get(_HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise ProtocolError(
                400, f"Inference-Header-Content-Length {header!r} is not a number"
            ) from None
        json_size = len(body) if header_length is None else header_length
        decoded = await self._codec(json_size > _OFFLOAD_BYTES, decode_request, body, header_length)
        info = model.signature(decoded.signature)
        where = f"{model.label}, signature {info.name!r}"
        inputs = bind(info, where, decoded.inputs)
        wanted = decoded.outputs
        if wanted is None:
            wanted = [(t.name, decoded.binary_output) for t in info.outputs]
        else:
            for output, _ in wanted:
                if output not in info.output_names:
                    raise ProtocolError(
                        400,
                        f"{where}: there is no output {output!r}; it has: "
                        f"{', '.join(info.output_names)}",
                    )
        # The arrays go on as they are: a batch of them is joined and converted once, in
        # a worker thread (dtype and shape were checked above).
        payload = next(iter(inputs.values())) if len(inputs) == 1 else inputs
        rows = 0
        if stats is not None:  # ops hook
            stats.decode.observe(time.perf_counter() - started)
            first = next(iter(inputs.values()), None)
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            stats.pending += rows
        try:
            result = await model.applier(info.name)(payload)
        except QueueFullError as exc:
            raise ProtocolError(503, str(exc), retry_after=1) from exc
        except SignatureError as exc:
            raise ProtocolError(400, str(exc)) from exc
        except Exception as exc:
            if _rejected_input(exc):  # TensorFlow found the values wrong while running
                raise ProtocolError(400, f"{where}: the model rejected the input: {exc}") from exc
            logger.exception("%s failed", where)
            raise ProtocolError(500, f"{where} failed; the server's log says why") from exc
        finally:
            if stats is not None:  # ops hook
                stats.pending -= rows
        encoding_started = time.perf_counter()  # ops hook
        outputs = [(output, result[output], binary) for output, binary in wanted]
        values = sum(a.size for _, a, binary in outputs if not binary)
        content, head = await self._codec(
            values > _OFFLOAD_VALUES,
            encode_response,
            model.source.name,
            model.source.version,
            decoded.id,
            outputs,
        )
        if stats is not None:  # ops hook
            stats.encode.observe(time.perf_counter() - encoding_started)
        if head is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(head)},
        )

    async def _codec(self, offload: bool, fn: Callable[..., Any], *args: Any) -> Any:
        if not offload:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._codec_threads)

    def routes(self) -> list[BaseRoute]:
        """The ``/v2`` routes; they go before the module host's catch-all route."""

        async def server_metadata(request: Request) -> Response:
            return _json(
                {"name": "asynchub", "version": __version__, "extensions": list(_EXTENSIONS)}
            )

        async def live(request: Request) -> Response:
            return _json({"live": True})

        async def ready(request: Request) -> Response:
            return _json({"ready": True})

        async def models(request: Request) -> Response:
            try:
                parsed = parse_model_path(request.path_params["path"])
                if parsed is None:
                    raise ProtocolError(404, "no such model path; see /v2/models/NAME")
                name, version, action = parsed
                wanted = "POST" if action == "infer" else "GET"
                if request.method != wanted:
                    raise ProtocolError(405, f"{action} takes {wanted}, not {request.method}")
                if action == "infer":
                    return await self.infer(name, version, request)
                model = await self.model(name, version)
                if action == "ready":
                    return _json({"name": name, "ready": True})
                found = await anyio.to_thread.run_sync(versions, self.root, name)
                signature = request.query_params.get("signature")
                return _json(model.metadata(signature, [s.version for s in found]))
            except ProtocolError as exc:
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                return _json({"error": exc.message}, exc.status, headers)

        async def elsewhere(request: Request) -> Response:
            return _json({"error": f"{request.url.path} is not served here"}, 404)

        return [
            Route("/v2", server_metadata, methods=["GET"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/v2/models/{path:path}", models, methods=["GET", "POST"]),
            # The rest of the protocol's space (repository, statistics, shared memory...)
            # answers in the protocol's shape too, rather than as a missing module.
            Route("/v2/{path:path}", elsewhere, methods=["GET", "POST"]),
        ]


def _rejected_input(exc: Exception) -> bool:
    """Whether ``exc`` is TensorFlow saying the input values are wrong (not a server fault)."""
    from .._tf import import_tensorflow

    tf = import_tensorflow()
    return isinstance(exc, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError))


def _json(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")
