"""The Open Inference Protocol's codec (KServe v2, REST, binary tensor data extension).

Plain functions, no I/O: model paths (``NAME[/versions/V][/infer|/ready]``), requests
decoded from JSON and binary tensors (inflated first when compressed), their inputs bound
to a signature, and responses encoded back. A request that is wrong raises
:class:`~asynchub.errors.ProtocolError` with the status to answer. numpy is imported
here, TensorFlow never: ``infer.py`` makes tensors of the arrays, and serves the routes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ..errors import ProtocolError

if TYPE_CHECKING:
    from .._module import SignatureInfo, TensorInfo

__all__ = [
    "DATATYPES",
    "InferRequest",
    "Tensor",
    "bind",
    "decode_request",
    "describe_tensor",
    "encode_response",
    "inflate",
    "parse_model_path",
]

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
#: A compressed request body may inflate to at most this (a gzip bomb stops here).
_MAX_INFLATED: Final = 1 << 30

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


def inflate(body: bytes, encoding: str) -> bytes:
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
