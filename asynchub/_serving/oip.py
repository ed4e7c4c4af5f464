"""The Open Inference Protocol's codec (KServe v2, REST, binary tensor data extension).

Plain functions, no I/O: model paths (``NAME[/versions/V][/infer|/ready]``), requests
decoded from JSON and binary tensors (inflated first when compressed), their inputs bound
to a signature, and responses encoded back. A request that is wrong raises
:class:`~asynchub.errors.ProtocolError` with the status to answer. numpy is imported
here, TensorFlow never: ``infer.py`` makes tensors of the arrays, and serves the routes.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ..errors import ProtocolError
from .datatypes import DATATYPES

if TYPE_CHECKING:
    from .._module import SignatureInfo, TensorInfo

__all__ = [
    "DATATYPES",
    "InferRequest",
    "Limits",
    "Tensor",
    "bind",
    "decode_remote",
    "decode_request",
    "describe_tensor",
    "encode_parts",
    "encode_response",
    "inflate",
    "parse_model_path",
]

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
#: numpy's own limit on dimensions is 64; TensorFlow takes fewer in practice.
_MAX_RANK: Final = 32
#: Values per piece when a big JSON answer is written, so a worker thread writing it
#: lets go of the GIL between pieces and the event loop keeps turning.
_CHUNK_VALUES: Final = 1 << 15
#: Binary outputs bigger than this are sent as views of their arrays.
_VIEW_BYTES: Final = 64 << 10

logger = logging.getLogger("asynchub.server")

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


@dataclass(frozen=True)
class Limits:
    """How big a request's inputs may be: rows (first dimension) and values in all.

    Checked on the shapes, before any array is made; over a limit is 413.
    """

    max_rows: int = 1 << 16
    max_elements: int = 1 << 24


def _show(value: Any) -> str:
    """``repr(value)``, cut short: an error message does not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _numpy_dtype(datatype: str) -> Any:
    if datatype == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NUMPY[datatype])


def _shape(name: str, value: Any, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        type(d) is int and d >= 0
        for d in value  # bool is an int, and no dimension
    ):
        raise ProtocolError(
            400,
            f"input {_show(name)}: shape must be a list of non-negative integers, "
            f"got {_show(value)}",
        )
    if len(value) > _MAX_RANK:
        raise ProtocolError(
            400,
            f"input {_show(name)}: shape has {len(value)} dimensions, "
            f"at most {_MAX_RANK} are taken",
        )
    # Every dimension counts, even beside a zero: [2**26, 0] holds no value but asks
    # for 2**26 rows of output.
    rows = value[0] if value else 1
    if rows > limits.max_rows:
        raise ProtocolError(
            413,
            f"input {_show(name)}: shape {_show(value)} has {rows} rows; this server takes at most "
            f"{limits.max_rows} per request (--max-request-rows): send fewer rows per request",
        )
    count = math.prod(value)
    # A zero hides how big the other dimensions are: [0, 2**63] must not reach numpy.
    if count > limits.max_elements or (not count and max(value, default=0) > limits.max_elements):
        raise ProtocolError(
            413,
            f"input {_show(name)}: shape {_show(value)} is too big; this server takes at most "
            f"{limits.max_elements} values per request (--max-request-elements)",
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
            raise ProtocolError(400, f"input {_show(name)}: BYTES data must be strings")
        array = np.empty(len(items), dtype=object)
        try:
            array[:] = [s.encode() for s in items]
        except UnicodeEncodeError as exc:  # "\ud800": valid JSON, but no text
            raise ProtocolError(
                400,
                f"input {_show(name)}: a BYTES string is not valid Unicode ({exc.reason}); "
                "send such bytes as binary data",
            ) from exc
    else:
        if isinstance(data, list) and len(data) > count:  # cheap: before numpy walks it
            raise ProtocolError(
                400,
                f"input {_show(name)}: shape {list(shape)} needs {count} values, "
                "the data hold more",
            )
        try:
            raw = np.asarray(data)
        except (ValueError, TypeError, RecursionError) as exc:  # ragged or too deep
            raise ProtocolError(
                400, f"input {_show(name)}: its data are not a regular array: {exc}"
            ) from exc
        family = datatype.rstrip("0123456789")
        if raw.size and raw.dtype.kind not in _JSON_KINDS[family]:
            given = _JSON_GAVE.get(raw.dtype.kind, "values of mixed types")
            raise ProtocolError(
                400, f"input {_show(name)}: its data are {given}, not {datatype} values"
            )
        dtype = _numpy_dtype(datatype)
        if raw.size and raw.dtype.kind in "iu" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise ProtocolError(
                    400, f"input {_show(name)}: a value is out of range for {datatype}"
                )
        with np.errstate(over="ignore"):  # overflow is checked just below
            array = raw.astype(dtype, copy=False)
        # 1e300 would become inf in FP32 (FP16 overflows past 65504).
        if (
            raw.size
            and raw.dtype.kind == "f"
            and dtype.itemsize < raw.dtype.itemsize
            and np.count_nonzero(np.isinf(array)) != np.count_nonzero(np.isinf(raw))
        ):
            raise ProtocolError(400, f"input {_show(name)}: a value is out of range for {datatype}")
    if array.size != count:
        raise ProtocolError(
            400,
            f"input {_show(name)}: shape {list(shape)} needs {count} values, "
            f"the data hold {array.size}",
        )
    return array.reshape(shape)


def _from_bytes(name: str, datatype: str, shape: tuple[int, ...], data: memoryview) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        offset, end = 0, len(data)
        while offset < end:
            if offset + 4 > end:
                raise ProtocolError(
                    400, f"input {_show(name)}: its BYTES binary data are cut short"
                )
            (size,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + size > end:
                raise ProtocolError(
                    400, f"input {_show(name)}: its BYTES binary data are cut short"
                )
            if len(items) == count:
                break  # one more than the shape says: refused below, without reading on
            items.append(bytes(data[offset : offset + size]))
            offset += size
        if len(items) != count or offset != end:
            raise ProtocolError(
                400,
                f"input {_show(name)}: shape {list(shape)} needs {count} strings, "
                f"got {'more' if offset != end else len(items)}",
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = _numpy_dtype(datatype)
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            400,
            f"input {_show(name)}: shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize} bytes of binary data, binary_data_size says {len(data)}",
        )
    if datatype == "BOOL" and count and np.frombuffer(data, np.uint8).max() > 1:
        raise ProtocolError(400, f"input {_show(name)}: BOOL binary data must be bytes 0 or 1")
    # A view of the body: no copy.
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def inflate(body: bytes | bytearray, encoding: str, limit: int) -> bytes:
    """``body`` inflated (``gzip`` or ``deflate``); 413 past ``limit`` bytes (a bomb stops
    there, having spent at most ``limit``), 415 for another encoding, 400 if corrupt."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(400, f"the {encoding} request body cannot be inflated: {exc}") from exc
    if len(out) > limit:
        raise ProtocolError(
            413,
            f"the request body inflates to more than {limit} bytes, the most this server "
            "takes (--max-input-size)",
        )
    if not inflater.eof:
        raise ProtocolError(400, f"the {encoding} request body is cut short")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Which of two equal keys counts differs between parsers; the request is refused
    # rather than read one way here and another way by a proxy that checked it.
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {_show(key)} appears twice in one object")
    return document


#: One decoder, made once (``json.loads`` with options makes one per call): RFC 8259 JSON,
#: UTF-8 (the caller decodes it), no NaN or Infinity, no key twice in an object.
_JSON: Final = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
_LIMITS: Final = Limits()


def _parameters(value: Any, kind: str = "", name: str = "") -> dict[str, Any]:
    """A ``parameters`` object (of the request, or of input or output ``name``): the
    protocol's values are strings, numbers and booleans."""
    if type(value) is dict and all(isinstance(v, (str, int, float)) for v in value.values()):
        return value  # bool is an int
    where = f"{kind} {_show(name)}: " if kind else ""
    if type(value) is not dict:
        raise ProtocolError(400, f"{where}parameters must be a JSON object")
    key, item = next((k, v) for k, v in value.items() if not isinstance(v, (str, int, float)))
    raise ProtocolError(
        400,
        f"{where}parameters.{_show(key)} must be a string, number or boolean, got "
        f"{type(item).__name__ if item is not None else 'null'}",
    )


def decode_request(
    body: bytes | bytearray, header_length: int | None, limits: Limits | None = None
) -> InferRequest:
    """Decode an inference request: JSON, then (with ``header_length``) binary tensors.

    Raises :class:`ProtocolError` naming what is wrong, and the input it is in: 400, or
    413 past ``limits``. Nothing else: any other failure to decode is a 400 too (logged).
    """
    try:
        return _decode(body, header_length, limits or _LIMITS)
    except ProtocolError:
        raise
    except MemoryError as exc:
        raise ProtocolError(413, "the request is too large to decode here") from exc
    except Exception as exc:  # a case the checks missed: still the request's fault
        logger.warning("an inference request could not be decoded", exc_info=True)
        raise ProtocolError(
            400, f"the request cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def decode_remote(
    body: bytes | bytearray, header_length: int | None, limits: Limits
) -> tuple[int, str] | InferRequest:
    """:func:`decode_request` for a worker process: its error as ``(status, message)``,
    which pickles (a :class:`ProtocolError` does not come back whole)."""
    try:
        return decode_request(body, header_length, limits)
    except ProtocolError as exc:
        return exc.status, exc.message


def _decode(body: bytes | bytearray, header_length: int | None, limits: Limits) -> InferRequest:
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(
            400,
            f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes",
        )
    head = body if header_length is None else body[:header_length]
    try:
        document = _JSON.decode(str(head, "utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request is not valid JSON: {str(exc)[:200]}") from exc
    except RecursionError as exc:
        raise ProtocolError(400, "the request is not valid JSON: it is nested too deep") from exc
    if not isinstance(document, dict):
        raise ProtocolError(400, "the request must be a JSON object")
    parameters = _parameters(document.get("parameters", {}))
    signature = parameters.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise ProtocolError(400, f"parameters.signature must be a string, got {_show(signature)}")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(400, "parameters.binary_data_output must be true or false")
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
    elements = 0
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError(400, "each input must be an object with a name")
        name = raw["name"]
        if name in seen:
            raise ProtocolError(400, f"input {_show(name)} is given twice")
        seen.add(name)
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or (
            datatype not in _NUMPY and datatype not in ("BF16", "BYTES")
        ):
            raise ProtocolError(400, f"input {_show(name)}: unknown datatype {_show(datatype)}")
        if "shape" not in raw:
            raise ProtocolError(400, f"input {_show(name)} has no shape")
        shape = _shape(name, raw["shape"], limits)
        elements += math.prod(shape)  # all inputs together
        if elements > limits.max_elements:
            raise ProtocolError(
                413,
                f"the inputs hold {elements} values or more; this server takes at most "
                f"{limits.max_elements} per request (--max-request-elements)",
            )
        params = _parameters(raw.get("parameters", {}), "input", name)
        size = params.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise ProtocolError(
                    400,
                    f"input {_show(name)} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header",
                )
            if "data" in raw:
                raise ProtocolError(
                    400, f"input {_show(name)} has both data and binary_data_size; give one"
                )
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise ProtocolError(
                    400,
                    f"input {_show(name)}: binary_data_size {_show(size)} runs past the body's end",
                )
            array = _from_bytes(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in raw:
            array = _from_json(name, datatype, shape, raw["data"])
        else:
            raise ProtocolError(400, f"input {_show(name)} has neither data nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, array))
    if offset != len(body):
        raise ProtocolError(
            400,
            f"the body has {len(body) - offset} bytes after the inputs' binary data; "
            "binary_data_size and Inference-Header-Content-Length must add up to it",
        )
    outputs: list[tuple[str, bool]] | None = None
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError(400, "outputs must be a list")
        outputs = []
        asked: set[str] = set()
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise ProtocolError(400, "each requested output must be an object with a name")
            name = raw["name"]
            if name in asked:
                raise ProtocolError(400, f"output {_show(name)} is asked for twice")
            asked.add(name)
            params = _parameters(raw.get("parameters", {}), "output", name)
            if "classification" in params:
                raise ProtocolError(400, "the classification extension is not supported")
            binary = params.get("binary_data", binary_output)
            if not isinstance(binary, bool):
                raise ProtocolError(
                    400, f"output {_show(name)}: parameters.binary_data must be true or false"
                )
            outputs.append((name, binary))
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


def describe_tensor(info: TensorInfo) -> dict[str, Any]:
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
    takes = ", ".join(
        f"{t.name} {describe_tensor(t)['datatype']} {_dims(t)}" for t in signature.inputs
    )
    given = {t.name: t for t in inputs}
    for name in expected:
        if name not in given:
            raise ProtocolError(400, f"{where}: input {_show(name)} is missing; it takes: {takes}")
    out: dict[str, Any] = {}
    for tensor in inputs:
        info = expected.get(tensor.name)
        if info is None:
            raise ProtocolError(
                400, f"{where}: there is no input {_show(tensor.name)}; it takes: {takes}"
            )
        datatype = DATATYPES.get(info.dtype, info.dtype.upper())
        if tensor.datatype != datatype:
            raise ProtocolError(
                400,
                f"{where}: input {_show(tensor.name)} must be {datatype}, got {tensor.datatype}",
            )
        dims = info.shape
        if dims is not None and (
            len(dims) != len(tensor.shape)
            or any(d is not None and d != s for d, s in zip(dims, tensor.shape, strict=True))
        ):
            raise ProtocolError(
                400,
                f"{where}: input {_show(tensor.name)} must have shape {_dims(info)}, "
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


def _json_values(name: str, datatype: str, flat: Any) -> list[Any]:
    if datatype == "BYTES":
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                400,
                f"output {_show(name)} holds bytes that are not UTF-8 text, which JSON cannot "
                "carry; ask for it as binary data",
            ) from exc
    if datatype == "BF16":
        flat = flat.astype(np.float32)
    values: list[Any] = flat.tolist()
    return values


def _json_data(name: str, datatype: str, array: Any) -> list[bytes]:
    """The JSON text of ``array``'s values, ``[...]``, in pieces of ``_CHUNK_VALUES``."""
    flat = array.ravel()
    pieces = [b"["]
    for start in range(0, flat.size, _CHUNK_VALUES):
        values = _json_values(name, datatype, flat[start : start + _CHUNK_VALUES])
        if start:
            pieces.append(b",")
        pieces.append(json.dumps(values, separators=(",", ":")).encode()[1:-1])
    pieces.append(b"]")
    return pieces


def encode_parts(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, Any, bool]],
) -> tuple[list[bytes | memoryview], int | None]:
    """:func:`encode_response` as pieces to send one after another, not joined: a big
    answer is written a piece at a time and never copied whole once more."""
    # Small answers are one json.dumps; big ones are written in pieces.
    small = sum(array.size for _, array, binary in outputs if not binary) <= _CHUNK_VALUES
    described: list[dict[str, Any]] = []
    texts: list[bytes] = []
    chunks: list[bytes | memoryview] = []
    for name, array, binary in outputs:
        datatype = _FROM_NUMPY.get(array.dtype)
        if datatype is None and array.dtype.name == "bfloat16":
            datatype = _FROM_NUMPY[array.dtype] = "BF16"
        if datatype is None:
            raise ProtocolError(
                500, f"output {_show(name)} has dtype {array.dtype}, not in the protocol"
            )
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data: bytes | memoryview
            if datatype == "BYTES":
                data = _to_bytes(array)
            else:
                little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                # A big one as a view, not copied; a small one is joined to the rest anyway.
                big = little.nbytes > _VIEW_BYTES
                data = little.reshape(-1).view(np.uint8).data if big else little.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif small:
            entry["data"] = _json_values(name, datatype, array.ravel())
        else:
            text = json.dumps(entry, separators=(",", ":")).encode()
            texts.append(b"".join([text[:-1], b',"data":', *_json_data(name, datatype, array)]))
            texts[-1] += b"}"
            continue
        described.append(entry)
        if not small:
            texts.append(json.dumps(entry, separators=(",", ":")).encode())
    document: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = described
    if small:
        head = json.dumps(document, separators=(",", ":")).encode()
    else:
        document["outputs"] = []
        opening = json.dumps(document, separators=(",", ":")).encode()[:-3]  # ..."outputs":
        head = b"".join([opening, b"[", b",".join(texts), b"]}"])
    if not chunks:
        return [head], None
    return [head, *chunks], len(head)


def encode_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, Any, bool]],
) -> tuple[bytes, int | None]:
    """The response body for ``outputs`` (name, array, as binary), and its JSON header's
    length when binary data follow it (``None``: the body is all JSON)."""
    parts, head = encode_parts(model, version, request_id, outputs)
    return b"".join(parts), head
