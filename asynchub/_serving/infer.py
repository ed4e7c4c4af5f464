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

Each request is bounded before its memory is spent (:class:`InferOptions`: body size,
compressed and inflated, rows, values, the time its body takes), and nothing big runs on
the event loop: a body is read by a raw ASGI endpoint into one buffer, big JSON is parsed
in a worker process, big binary data and big answers in worker threads, in pieces.

The protocol's codec (paths, decoding requests, binding them to a signature, encoding
responses) is plain functions in ``oip.py``; :class:`Inference` here holds the models and
the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
from starlette.datastructures import QueryParams
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from .._batching import in_thread
from .._module import Module, SignatureInfo, default_signature, load_module
from .._version import __version__
from ..errors import HubError, ProtocolError, QueueFullError, SignatureError
from .oip import (
    Limits,
    bind,
    decode_remote,
    decode_request,
    describe_tensor,
    encode_parts,
    inflate,
    parse_model_path,
)
from .options import InferOptions
from .repository import ModuleSource, latest, locate, scan, versions

if TYPE_CHECKING:  # ops hook
    from .ops import ModelStats, Ops

__all__ = ["Inference"]

logger = logging.getLogger("asynchub.server")

#: A body bigger than this is inflated and decoded (and outputs with more values than
#: _OFFLOAD_VALUES are encoded, in pieces) in a worker thread, so one big request does
#: not stall the event loop for the others.
_OFFLOAD_BYTES: Final = 256 << 10
_OFFLOAD_VALUES: Final = 1 << 16
#: JSON bigger than this is parsed in a worker process: a thread parsing it would hold
#: the GIL, and so the event loop, for the whole parse (~20 ms per MB).
_PROCESS_BYTES: Final = 1 << 20
_PROCESS_WORKERS: Final = 2
#: An answer up to this size is sent in one piece; a bigger one as it was encoded.
_JOIN_BYTES: Final = 256 << 10
#: Seconds a name's latest version is remembered before the directory is listed again.
_LATEST_TTL: Final = 2.0
_MEMO_LIMIT: Final = 1024
_PLATFORM: Final = "tensorflow_savedmodel"
_EXTENSIONS: Final = ("binary_tensor_data",)


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
        # Decoding and encoding big bodies, in pieces that let the loop turn.
        self._codec_threads = anyio.CapacityLimiter(2)
        # Big JSON bodies are parsed in worker processes, made on first need.
        self._processes: ProcessPoolExecutor | None = None
        self._process_waiters = anyio.CapacityLimiter(_PROCESS_WORKERS)
        self._no_processes = False
        self._processes_worked = False
        self._limits = Limits(options.max_request_rows, options.max_request_elements)
        self._asyncio = False  # set by start(): the event loop is asyncio's (or uvloop)
        self.ops: Ops | None = None  # ops hook: the app's metrics, set by create_app

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Import TensorFlow (so the first request does not wait for it), then load every
        model version under ROOT if the options say ``preload``."""
        from .._tf import import_tensorflow

        self._asyncio = _on_asyncio()
        await anyio.to_thread.run_sync(import_tensorflow, limiter=self._load_threads)
        if not self.options.preload:
            return
        for source in await anyio.to_thread.run_sync(scan, self.root):
            try:
                await self._load((source.name, source.version))
            except ProtocolError as exc:  # logged; requests for it answer with the error
                logger.error("preloading %s/%s failed: %s", source.name, source.version, exc)

    async def close(self) -> None:
        processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown(wait=False, cancel_futures=True)
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

    async def infer(
        self, name: str, version: str | None, headers: _Headers, receive: Receive
    ) -> Response:
        arrival = time.perf_counter()
        model = await self.model(name, version)
        stats = model.stats
        if stats is None:
            return await self._infer(model, headers, receive, None)
        # ops hook: each request a model answers is counted by its outcome.
        try:
            response = await self._infer(model, headers, receive, stats)
        except ProtocolError as exc:
            stats.failed(exc.status)
            raise
        except Exception:
            stats.failed(500)
            raise
        stats.succeeded(time.perf_counter() - arrival)
        return response

    async def _infer(
        self, model: _Model, headers: _Headers, receive: Receive, stats: ModelStats | None
    ) -> Response:
        started = time.perf_counter()  # ops hook
        body = await self._read_body(headers, receive)
        encoding = (headers.encoding or "identity").strip().lower()
        if encoding != "identity":
            body = await self._codec(
                len(body) > _OFFLOAD_BYTES, inflate, body, encoding, self.options.max_input_size
            )
        header_length = _header_length(headers.header_length)
        decoded = await self._decode(body, header_length)
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
        # Values written one by one: JSON ones, and BYTES strings even as binary.
        values = sum(a.size for _, a, binary in outputs if not binary or a.dtype == object)
        parts, head = await self._codec(
            values > _OFFLOAD_VALUES,
            encode_parts,
            model.source.name,
            model.source.version,
            decoded.id,
            outputs,
        )
        if stats is not None:  # ops hook
            stats.encode.observe(time.perf_counter() - encoding_started)
        if head is None:
            return _Parts(parts, "application/json")
        return _Parts(
            parts, "application/octet-stream", {"Inference-Header-Content-Length": str(head)}
        )

    async def _read_body(self, headers: _Headers, receive: Receive) -> bytes | bytearray:
        """The request's body, read into one buffer: refused (413) as soon as it is known
        to pass ``max_input_size``, and (408) if it is not all there in ``body_timeout``."""
        limit = self.options.max_input_size
        declared = headers.length
        length: int | None = None
        if declared is not None:
            if not declared.isdigit():  # uvicorn's parser lets no such request through
                raise ProtocolError(400, f"Content-Length {declared!r} is not a number")
            length = int(declared)
            if length > limit:
                raise _too_large(f"the request body has {length} bytes", limit)
        try:
            if self._asyncio:  # a third of the cost of anyio's scope, on every request
                async with asyncio.timeout(self.options.body_timeout):
                    return await _receive_into(receive, length, limit)
            with anyio.fail_after(self.options.body_timeout):
                return await _receive_into(receive, length, limit)
        except TimeoutError:
            raise ProtocolError(
                408,
                f"the request body did not arrive within {self.options.body_timeout:g} s "
                "(--body-timeout); send it faster, or send less",
            ) from None

    async def _decode(self, body: bytes | bytearray, header_length: int | None) -> Any:
        """The request decoded: big JSON in a worker process, so the event loop's process
        does not hold the GIL for it (CPython's JSON parser and ``np.asarray`` never let go
        of it); big binary data in a worker thread; small requests on the loop."""
        limits = self._limits
        json_size = len(body) if header_length is None else min(header_length, len(body))
        if json_size > _PROCESS_BYTES and not self._no_processes:
            try:
                decoded = await self._in_process(decode_remote, body, header_length, limits)
            except (BrokenProcessPool, OSError) as exc:
                processes, self._processes = self._processes, None
                if processes is not None:
                    processes.shutdown(wait=False, cancel_futures=True)
                if self._processes_worked:  # a worker died on this request (out of memory?)
                    logger.error("a worker process died decoding a request: %s", exc)
                    raise ProtocolError(
                        500, "the request could not be decoded; the server's log says why"
                    ) from exc
                # Worker processes cannot start here: decode in a thread from now on.
                logger.warning("big JSON requests are decoded in a thread: %s", exc)
                self._no_processes = True
            else:
                self._processes_worked = True
                if isinstance(decoded, tuple):
                    raise ProtocolError(*decoded)
                return decoded
        return await self._codec(
            len(body) > _OFFLOAD_BYTES, decode_request, body, header_length, limits
        )

    async def _in_process(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._processes is None:
            # forkserver: the workers are not forks of this process and its TensorFlow
            # threads; they import numpy and the codec, nothing more.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["asynchub._serving.oip"])
            self._processes = ProcessPoolExecutor(_PROCESS_WORKERS, mp_context=context)
        with _without_main():
            future = self._processes.submit(fn, *args)
        try:
            return await anyio.to_thread.run_sync(future.result, limiter=self._process_waiters)
        finally:
            future.cancel()

    async def _codec(self, offload: bool, fn: Callable[..., Any], *args: Any) -> Any:
        if not offload:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._codec_threads)

    def routes(self) -> list[BaseRoute]:
        """The ``/v2`` routes; they go before the module host's catch-all route."""

        async def server_metadata(scope: Scope, receive: Receive) -> Response:
            _allow(scope, _GET, "the server's metadata")
            return _json(
                {"name": "asynchub", "version": __version__, "extensions": list(_EXTENSIONS)}
            )

        async def live(scope: Scope, receive: Receive) -> Response:
            _allow(scope, _GET, "health")
            return _json({"live": True})

        async def ready(scope: Scope, receive: Receive) -> Response:
            _allow(scope, _GET, "health")
            return _json({"ready": True})

        async def models(scope: Scope, receive: Receive) -> Response:
            parsed = parse_model_path(scope["path_params"]["path"])
            if parsed is None:
                raise ProtocolError(404, "no such model path; see /v2/models/NAME")
            name, version, action = parsed
            _allow(scope, _POST if action == "infer" else _GET, action)
            if action == "infer":
                return await self.infer(name, version, _Headers(scope), receive)
            model = await self.model(name, version)
            if action == "ready":
                return _json({"name": name, "ready": True})
            found = await anyio.to_thread.run_sync(versions, self.root, name)
            signature = QueryParams(scope["query_string"]).get("signature")
            return _json(model.metadata(signature, [s.version for s in found]))

        async def elsewhere(scope: Scope, receive: Receive) -> Response:
            return _json({"error": f"{scope['path']} is not served here"}, 404)

        return [
            Route("/v2", _Endpoint(server_metadata)),
            Route("/v2/health/live", _Endpoint(live)),
            Route("/v2/health/ready", _Endpoint(ready)),
            Route("/v2/models/{path:path}", _Endpoint(models)),
            # The rest of the protocol's space (repository, statistics, shared memory...)
            # answers in the protocol's shape too, rather than as a missing module.
            Route("/v2/{path:path}", _Endpoint(elsewhere)),
        ]


class _Headers:
    """The request headers ``/infer`` reads, found in one pass."""

    __slots__ = ("encoding", "header_length", "length")

    def __init__(self, scope: Scope) -> None:
        self.length: str | None = None
        self.encoding: str | None = None
        self.header_length: str | None = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                self.length = value.decode("latin-1")
            elif key == b"content-encoding":
                self.encoding = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                self.header_length = value.decode("latin-1")


_GET: Final = ("GET", "HEAD")
_POST: Final = ("POST",)


class _ClientGone(Exception):
    """The client left before its body was read: there is no one to answer."""


class _MethodNotAllowed(ProtocolError):
    def __init__(self, message: str, allow: Sequence[str]) -> None:
        super().__init__(405, message)
        self.allow = allow


def _allow(scope: Scope, methods: Sequence[str], what: str) -> None:
    method = scope["method"]
    if method not in methods:
        raise _MethodNotAllowed(f"{what} takes {' or '.join(methods)}, not {method}", methods)


def _too_large(what: str, limit: int) -> ProtocolError:
    return ProtocolError(413, f"{what}; this server takes at most {limit} (--max-input-size)")


async def _receive_into(receive: Receive, length: int | None, limit: int) -> bytes | bytearray:
    """The ASGI body: with a length, each chunk goes straight to its place in one buffer;
    chunked, the buffer grows, counted against ``limit``."""
    message: Message | None = await receive()
    assert message is not None
    if message["type"] == "http.request" and not message.get("more_body", False):
        whole: bytes = message.get("body", b"")  # all in one message: no buffer to fill
        if len(whole) > limit:
            raise _too_large(f"the request body has more than {limit} bytes", limit)
        return whole
    body = bytearray(length or 0)
    view = memoryview(body)
    filled = 0
    more = True
    while more:
        if message is None:
            message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        end = filled + len(chunk)
        if length is not None and end <= length:
            view[filled:end] = chunk
        else:
            if end > limit:
                raise _too_large(f"the request body has more than {limit} bytes", limit)
            view.release()
            body[filled:] = chunk
            view = memoryview(body)
        filled = end
        message = None
    view.release()
    if filled != len(body):
        del body[filled:]
    return body


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Hide ``__main__`` while worker processes start (``submit`` starts them): they would
    run the main script again to find it, and a script that calls ``uvicorn.run`` without
    a ``__name__`` guard would start another server in each."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _header_length(header: str | None) -> int | None:
    if header is None:
        return None
    value = header.strip()
    if not value.isdigit() or not value.isascii():  # int() would take "+5", "1_0", "٣"
        raise ProtocolError(400, f"Inference-Header-Content-Length {header!r} is not a number")
    return int(value)


class _Endpoint:
    """An ASGI endpoint of the protocol: every answer, errors too, in its JSON shape.

    Raw ASGI rather than a starlette ``Request``: ``/infer`` reads its body itself, into
    one buffer, with limits (starlette keeps every chunk and joins them: a copy).
    """

    def __init__(self, handle: Callable[[Scope, Receive], Awaitable[Response]]) -> None:
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handle(scope, receive)
        except _ClientGone:
            return
        except ProtocolError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
            if isinstance(exc, _MethodNotAllowed):
                headers["Allow"] = ", ".join(exc.allow)
            if exc.status in (408, 413):  # the body was not read: the connection cannot go on
                headers["Connection"] = "close"
            response = _json({"error": exc.message}, exc.status, headers)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            response = _json({"error": "the server failed; its log says why"}, 500)
        await response(scope, receive, send)


class _Parts(Response):
    """A response sent as the pieces it was encoded in, with one Content-Length."""

    def __init__(
        self,
        parts: list[bytes | memoryview],
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.parts = parts
        self.status_code = 200
        size = sum(len(p) for p in parts)
        self.raw_headers = [
            (b"content-length", str(size).encode()),
            (b"content-type", media_type.encode()),
        ]
        for key, value in (headers or {}).items():
            self.raw_headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        parts = self.parts
        if len(parts) > 1 and sum(len(p) for p in parts) <= _JOIN_BYTES:
            parts = [b"".join(parts)]  # one write, one system call: cheaper than the copy
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


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
