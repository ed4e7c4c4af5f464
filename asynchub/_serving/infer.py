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
and signature with :meth:`Module.batched`. TensorFlow's calls run in the module's few
worker threads, never on the event loop; only small inputs become tensors there.

The protocol logic (paths, decoding requests, binding them to a signature, encoding
responses) is plain functions here; :class:`Inference` holds the models and the routes.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import __version__
from ._module import Module, SignatureInfo, TensorInfo, default_signature, load_module
from .errors import HubError, QueueFullError, SignatureError
from .server import ARCHIVE_SUFFIX, InferOptions, ModuleSource, _version_key, locate

__all__ = [
    "Inference",
    "ProtocolError",
    "Tensor",
    "bind",
    "decode_request",
    "encode_response",
    "latest",
    "parse_model_path",
    "versions",
]

logger = logging.getLogger("asynchub.server")

#: TensorFlow dtype name -> the protocol's datatype.
DATATYPES: Final = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}
# The protocol's datatype -> numpy's (little-endian, as the binary extension is); BF16
# comes from ml_dtypes (TensorFlow's own dependency) when first needed.
_NUMPY: Final = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# numpy dtype -> the protocol's datatype, for outputs (bfloat16 is added when first seen).
_FROM_NUMPY: dict[Any, str] = {np.dtype(code): datatype for datatype, code in _NUMPY.items()} | {
    np.dtype(object): "BYTES"
}
#: Which numpy kinds of JSON data each datatype family takes (JSON has no float32).
_JSON_KINDS: Final = {"BOOL": "b", "INT": "iu", "UINT": "iu", "FP": "iuf", "BF": "iuf"}
_JSON_GAVE: Final = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "numbers",
    "U": "strings",
}
#: A JSON part bigger than this is parsed (and outputs with more values than
#: _OFFLOAD_VALUES are encoded) in a worker thread, so one big request does not stall
#: the event loop for the others.
_OFFLOAD_BYTES: Final = 256 << 10
_OFFLOAD_VALUES: Final = 1 << 16
#: A compressed request body may inflate to at most this (a gzip bomb stops here).
_MAX_INFLATED: Final = 1 << 30
#: Seconds a name's latest version is remembered before the directory is listed again.
_LATEST_TTL: Final = 2.0
_MEMO_LIMIT: Final = 1024
_PLATFORM: Final = "tensorflow_savedmodel"
_EXTENSIONS: Final = ("binary_tensor_data",)
_HEADER_LENGTH: Final = "inference-header-content-length"


class ProtocolError(Exception):
    """A request the protocol answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


# -- paths ----------------------------------------------------------------------------------


def _safe(segment: str) -> bool:
    return bool(segment) and not segment.startswith(".") and not ({"\\", "\x00"} & set(segment))


def parse_model_path(path: str) -> tuple[str, str | None, str] | None:
    """``"digits/versions/1/infer"`` -> ``("digits", "1", "infer")``; ``None`` if unsafe.

    ``path`` follows ``/v2/models/``, percent-decoded. The action is ``"infer"``,
    ``"ready"`` or ``"metadata"`` (no suffix). NAME may contain slashes, as in ROOT;
    the segments are checked like :func:`~asynchub.server.split_module_path` checks them.
    """
    segments = path.split("/")
    action = "metadata"
    if segments[-1] in ("infer", "ready"):
        action = segments.pop()
    version: str | None = None
    if len(segments) >= 3 and segments[-2] == "versions":
        version = segments.pop()
        segments.pop()
    if not segments or not all(map(_safe, segments)):
        return None
    if version is not None and not _safe(version):
        return None
    return "/".join(segments), version, action


def versions(root: Path, name: str) -> list[ModuleSource]:
    """The versions of module ``name`` under ``root`` (resolved), oldest first.

    Numeric versions in numeric order (``2`` before ``10``), then the others; a
    ``V.tar.gz`` archive wins over a ``V/`` directory, as for downloads.
    """
    try:
        entries = os.listdir(root / name)
    except (OSError, ValueError):
        return []
    found: dict[str, ModuleSource] = {}
    for entry in entries:
        version = entry.removesuffix(ARCHIVE_SUFFIX)
        if _safe(entry) and version and version not in found:
            source = locate(root, name, version)
            if source is not None:
                found[version] = source
    return sorted(found.values(), key=_version_key)


def latest(found: Sequence[ModuleSource]) -> str | None:
    """The version a request without one gets: the highest number, else the last name."""
    numbered = [s.version for s in found if s.version.isdigit()]
    if numbered:
        return numbered[-1]  # versions() sorts numbers numerically
    return found[-1].version if found else None


# -- tensors in and out ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One input of a request: its name, datatype and shape, and its values as an array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray[Any, Any]


@dataclass
class InferRequest:
    """A decoded ``/infer`` request."""

    id: str | None
    inputs: list[Tensor]
    #: The outputs asked for, each with whether it goes back as binary; ``None``: all.
    outputs: list[tuple[str, bool]] | None
    #: ``parameters.binary_data_output``: every output not asked for by name goes as binary.
    binary_output: bool
    signature: str | None
    parameters: dict[str, Any] = field(default_factory=dict)


def _numpy_dtype(datatype: str) -> Any:
    if datatype == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NUMPY[datatype])


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        type(d) is int and d >= 0
        for d in value  # bool is an int, and no dimension
    ):
        raise ProtocolError(
            400, f"input {name!r}: shape must be a list of non-negative integers, got {value!r}"
        )
    return tuple(value)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _flatten(data)
        if not all(isinstance(s, str) for s in items):
            raise ProtocolError(400, f"input {name!r}: BYTES data must be strings")
        array = np.empty(len(items), dtype=object)
        array[:] = [s.encode() for s in items]
    else:
        try:
            raw = np.asarray(data)
        except ValueError as exc:  # ragged nesting
            raise ProtocolError(
                400, f"input {name!r}: its data are not a regular array: {exc}"
            ) from exc
        family = datatype.rstrip("0123456789")
        if raw.size and raw.dtype.kind not in _JSON_KINDS[family]:
            given = _JSON_GAVE.get(raw.dtype.kind, "values of mixed types")
            raise ProtocolError(400, f"input {name!r}: its data are {given}, not {datatype} values")
        dtype = _numpy_dtype(datatype)
        if raw.size and raw.dtype.kind in "iu" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise ProtocolError(400, f"input {name!r}: a value is out of range for {datatype}")
        array = raw.astype(dtype, copy=False)
    if array.size != count:
        raise ProtocolError(
            400,
            f"input {name!r}: shape {list(shape)} needs {count} values, the data hold {array.size}",
        )
    return array.reshape(shape)


def _from_bytes(name: str, datatype: str, shape: tuple[int, ...], data: memoryview) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        offset, end = 0, len(data)
        while offset < end:
            if offset + 4 > end:
                raise ProtocolError(400, f"input {name!r}: its BYTES binary data are cut short")
            (size,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + size > end:
                raise ProtocolError(400, f"input {name!r}: its BYTES binary data are cut short")
            items.append(bytes(data[offset : offset + size]))
            offset += size
        if len(items) != count:
            raise ProtocolError(
                400, f"input {name!r}: shape {list(shape)} needs {count} strings, got {len(items)}"
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = _numpy_dtype(datatype)
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            400,
            f"input {name!r}: shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize} bytes of binary data, binary_data_size says {len(data)}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _inflate(body: bytes, encoding: str) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, _MAX_INFLATED)
    except zlib.error as exc:
        raise ProtocolError(400, f"the {encoding} request body cannot be inflated: {exc}") from exc
    if inflater.unconsumed_tail:
        raise ProtocolError(413, f"the request body inflates to more than {_MAX_INFLATED} bytes")
    return out


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an inference request: JSON, then (with ``header_length``) binary tensors.

    Raises :class:`ProtocolError` (400) naming what is wrong, and the input it is in.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(
            400,
            f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes",
        )
    head = body if header_length is None else body[:header_length]
    try:
        document = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ProtocolError(400, "the request must be a JSON object")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "parameters must be a JSON object")
    signature = parameters.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise ProtocolError(400, f"parameters.signature must be a string, got {signature!r}")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "id must be a string")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise ProtocolError(400, "the request has no list of inputs")
    view = memoryview(body)
    offset = len(head)
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError(400, "each input must be an object with a name")
        name = raw["name"]
        if name in seen:
            raise ProtocolError(400, f"input {name!r} is given twice")
        seen.add(name)
        datatype = raw.get("datatype")
        if datatype not in _NUMPY and datatype not in ("BF16", "BYTES"):
            raise ProtocolError(400, f"input {name!r}: unknown datatype {datatype!r}")
        shape = _shape(name, raw.get("shape"))
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(400, f"input {name!r}: parameters must be a JSON object")
        size = params.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise ProtocolError(
                    400,
                    f"input {name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header",
                )
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise ProtocolError(
                    400, f"input {name!r}: binary_data_size {size!r} runs past the body's end"
                )
            array = _from_bytes(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in raw:
            array = _from_json(name, datatype, shape, raw["data"])
        else:
            raise ProtocolError(400, f"input {name!r} has neither data nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, array))
    if offset != len(body):
        raise ProtocolError(
            400,
            f"the body has {len(body) - offset} bytes after the inputs' binary data; "
            "binary_data_size and Inference-Header-Content-Length must add up to it",
        )
    outputs: list[tuple[str, bool]] | None = None
    binary_output = parameters.get("binary_data_output") is True
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError(400, "outputs must be a list")
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise ProtocolError(400, "each requested output must be an object with a name")
            params = raw.get("parameters") or {}
            if not isinstance(params, dict):
                raise ProtocolError(400, f"output {raw['name']!r}: parameters must be an object")
            if "classification" in params:
                raise ProtocolError(400, "the classification extension is not supported")
            outputs.append((raw["name"], bool(params.get("binary_data", binary_output))))
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        binary_output=binary_output,
        signature=signature,
        parameters=parameters,
    )


def _dims(info: TensorInfo) -> list[int]:
    return [-1] if info.shape is None else [-1 if d is None else d for d in info.shape]


def _describe(info: TensorInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "datatype": DATATYPES.get(info.dtype, info.dtype.upper()),
        "shape": _dims(info),
    }


def bind(signature: SignatureInfo, where: str, inputs: Sequence[Tensor]) -> dict[str, Any]:
    """The request's arrays by input name, once every input fits the signature.

    Raises :class:`ProtocolError` (400) naming the input that is missing, unknown, or of
    the wrong datatype or shape.
    """
    expected = {t.name: t for t in signature.inputs}
    takes = ", ".join(f"{t.name} {_describe(t)['datatype']} {_dims(t)}" for t in signature.inputs)
    given = {t.name: t for t in inputs}
    for name in expected:
        if name not in given:
            raise ProtocolError(400, f"{where}: input {name!r} is missing; it takes: {takes}")
    out: dict[str, Any] = {}
    for tensor in inputs:
        info = expected.get(tensor.name)
        if info is None:
            raise ProtocolError(
                400, f"{where}: there is no input {tensor.name!r}; it takes: {takes}"
            )
        datatype = DATATYPES.get(info.dtype, info.dtype.upper())
        if tensor.datatype != datatype:
            raise ProtocolError(
                400, f"{where}: input {tensor.name!r} must be {datatype}, got {tensor.datatype}"
            )
        dims = info.shape
        if dims is not None and (
            len(dims) != len(tensor.shape)
            or any(d is not None and d != s for d, s in zip(dims, tensor.shape, strict=True))
        ):
            raise ProtocolError(
                400,
                f"{where}: input {tensor.name!r} must have shape {_dims(info)}, "
                f"got {list(tensor.shape)}",
            )
        out[tensor.name] = tensor.array
    return out


def _to_bytes(array: Any) -> bytes:
    parts = []
    for item in array.ravel():
        value = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(value)))
        parts.append(value)
    return b"".join(parts)


def encode_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, Any, bool]],
) -> tuple[bytes, int | None]:
    """The response body for ``outputs`` (name, array, as binary), and its JSON header's
    length when binary data follow it (``None``: the body is all JSON)."""
    described = []
    chunks: list[bytes] = []
    for name, array, binary in outputs:
        datatype = _FROM_NUMPY.get(array.dtype)
        if datatype is None and array.dtype.name == "bfloat16":
            datatype = _FROM_NUMPY[array.dtype] = "BF16"
        if datatype is None:
            raise ProtocolError(
                500, f"output {name!r} has dtype {array.dtype}, not in the protocol"
            )
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = (
                _to_bytes(array)
                if datatype == "BYTES"
                else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif datatype == "BYTES":
            try:
                entry["data"] = [
                    v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()
                ]
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    400,
                    f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                    "carry; ask for it as binary data",
                ) from exc
        elif datatype == "BF16":
            entry["data"] = array.astype(np.float32).ravel().tolist()
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = described
    head = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


# -- the models -------------------------------------------------------------------------------

#: Applies a signature to one request: a lone tensor for a single input, else a dict.
Apply = Callable[[Any], Awaitable[dict[str, Any]]]


class _Model:
    """A loaded model version, and how each of its signatures is applied."""

    def __init__(self, source: ModuleSource, module: Module, options: InferOptions) -> None:
        self.source = source
        self.module = module
        self.options = options
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
                batched: Apply = self.module.batched(
                    signature,
                    max_batch_size=options.max_batch_size,
                    max_delay=options.max_delay,
                    max_queue=options.max_queue,
                    as_dict=True,
                )
                return batched
            except SignatureError as exc:  # e.g. an input without a batch dimension
                logger.info(
                    "%s, signature %r: requests run one by one: %s", self.label, signature, exc
                )
        module, limit = self.module, options.max_queue

        async def unbatched(inputs: Any) -> dict[str, Any]:
            first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
            rows = int(first.shape[0]) if first is not None and first.shape.rank else 1
            if limit is not None and self._in_flight >= limit:
                raise QueueFullError(
                    f"{self.label}: {self._in_flight} rows are already in flight "
                    f"(max_queue={limit}); the model is overloaded, try again later",
                    handle=module.handle,
                )
            self._in_flight += rows
            try:
                result: dict[str, Any] = await module.acall(
                    inputs, signature=signature, as_dict=True
                )
                return result
            finally:
                self._in_flight -= rows

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
            "inputs": [_describe(t) for t in info.inputs] if info else [],
            "outputs": [_describe(t) for t in info.outputs] if info else [],
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

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Import TensorFlow (so the first request does not wait for it), then load every
        model version under ROOT if the options say ``preload``."""
        from ._tf import import_tensorflow

        await anyio.to_thread.run_sync(import_tensorflow, limiter=self._load_threads)
        if not self.options.preload:
            return
        from .server import scan

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
            # The details (paths on this machine) go to the log, not to the client.
            logger.error("cannot load model %s version %s: %s", name, version, exc)
            raise ProtocolError(
                500,
                f"model {name!r} version {version!r} cannot be loaded; the server's log says why",
            ) from exc
        model = _Model(source, module, self.options)
        self._loaded[(name, version)] = model
        logger.info(
            "loaded model %s version %s from %s in %.2f s",
            name,
            version,
            source.path,
            time.perf_counter() - started,
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
                from ._hub import AsyncHub

                hub = AsyncHub()
                await hub.__aenter__()
                self._hub = hub
        return self._hub

    # -- requests -----------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: Request) -> Response:
        model = await self.model(name, version)
        body = await request.body()
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            body = await self._codec(len(body) > _OFFLOAD_BYTES, _inflate, body, encoding)
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
        # tf.constant is the cheapest way in (less than half of convert_to_tensor's cost),
        # and a lone tensor takes the batcher's fast path: dtype and shape were checked above.
        size = sum(a.nbytes for a in inputs.values())
        tensors = await self._codec(size > _OFFLOAD_BYTES, _as_tensors, inputs)
        payload = next(iter(tensors.values())) if len(tensors) == 1 else tensors
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
        outputs = [(output, result[output].numpy(), binary) for output, binary in wanted]
        values = sum(a.size for _, a, binary in outputs if not binary)
        content, head = await self._codec(
            values > _OFFLOAD_VALUES,
            encode_response,
            model.source.name,
            model.source.version,
            decoded.id,
            outputs,
        )
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


def _as_tensors(arrays: dict[str, Any]) -> dict[str, Any]:
    from ._tf import import_tensorflow

    constant = import_tensorflow().constant
    return {name: constant(array) for name, array in arrays.items()}


def _rejected_input(exc: Exception) -> bool:
    """Whether ``exc`` is TensorFlow saying the input values are wrong (not a server fault)."""
    from ._tf import import_tensorflow

    tf = import_tensorflow()
    return isinstance(exc, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError))


def _json(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")
