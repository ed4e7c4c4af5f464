"""Every malformed ``/infer`` request is a 4xx in the protocol's shape, never a 500.

``decode_request`` is total: whatever the bytes, it returns an ``InferRequest`` or raises
``ProtocolError`` with a 4xx status (a fuzzer checks it with hostile documents). The
``/v2`` routes follow RFC 9110 (405 with ``Allow``, ``HEAD`` wherever ``GET`` is) and
RFC 8259 (no ``NaN``, no duplicate keys), checked on a real server.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from .test_infer_limits import Server, spawn_server

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def _decode(body: bytes, header_length: int | None = None) -> Any:
    from asynchub._serving.oip import decode_request

    return decode_request(body, header_length)


def _refused(body: bytes, header_length: int | None = None, status: int = 400) -> str:
    from asynchub.errors import ProtocolError

    with pytest.raises(ProtocolError) as caught:
        _decode(body, header_length)
    assert caught.value.status == status, caught.value.message
    return caught.value.message


def _one(**fields: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], **fields}
    tensor = {k: v for k, v in tensor.items() if v is not ...}
    return json.dumps({"inputs": [tensor]}).encode()


# -- what the review found: 500s, now 400s ----------------------------------------------------


def test_json_nested_too_deep_is_400() -> None:
    assert "too deep" in _refused(b"[" * 50_000 + b"]" * 50_000)
    assert "too deep" in _refused(b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")


def test_a_shape_past_any_array_is_refused() -> None:
    assert "rows" in _refused(_one(shape=[2**63, 0], data=[]), status=413)
    assert "too big" in _refused(_one(shape=[0, 2**63], data=[]), status=413)
    assert "dimensions" in _refused(_one(shape=[1] * 100, data=[1.0]))


def test_a_lone_surrogate_in_bytes_is_400() -> None:
    message = _refused(_one(datatype="BYTES", data=["\ud800"]))
    assert "'x'" in message and "Unicode" in message


# -- RFC 8259 and the protocol's own rules ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "NaN"),
        (b'{"inputs": [], "id": Infinity}', "Infinity"),
        (b'{"inputs": [], "inputs": []}', "'inputs' appears twice"),
        (_one(shape=...), "no shape"),
        (_one(parameters={"binary_data_size": 4}), "Inference-Header"),
        (_one(parameters={"note": {"a": 1}}), "string, number or boolean"),
        (_one(parameters={"note": None}), "string, number or boolean"),
        (_one(parameters=None), "parameters must be a JSON object"),
        (_one(datatype="FP16", data=[1e6]), "out of range for FP16"),
        (_one(datatype="FP32", data=[1e300]), "out of range for FP32"),
        (_one(data=[1.0, 2.0]), "needs 1 values"),
        (b'{"inputs": [], "parameters": {"binary_data_output": 1}}', "true or false"),
        (
            b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}',
            "true or false",
        ),
        (b'{"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}', "'y' is asked for twice"),
    ],
)
def test_decode_follows_the_protocol_to_the_letter(body: bytes, words: str) -> None:
    assert words in _refused(body)


def test_binary_data_follow_the_extension_to_the_letter() -> None:
    def binary(datatype: str, shape: list[int], raw: bytes, **extra: Any) -> tuple[bytes, int]:
        params = {"binary_data_size": len(raw)}
        tensor = {"name": "x", "datatype": datatype, "shape": shape, "parameters": params}
        head = json.dumps({"inputs": [tensor | extra]}).encode()
        return head + raw, len(head)

    assert "0 or 1" in _refused(*binary("BOOL", [2], b"\x01\x02"))
    assert "both data" in _refused(*binary("FP32", [1], b"\0\0\0\0", data=[1.0]))
    two = b"\x01\0\0\0a\x01\0\0\0b"
    assert "needs 1 strings, got more" in _refused(*binary("BYTES", [1], two))
    ok = _decode(*binary("BOOL", [2], b"\x01\x00"))
    np.testing.assert_array_equal(ok.inputs[0].array, [True, False])


# -- a fuzzer: hostile documents, every outcome an InferRequest or a 4xx -------------------------

_HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**31,
    2**63,
    2**64,
    -(2**63) - 1,
    10**400,
    1e308,
    "",
    "\ud800",
    "\x00",
    "FP32",
    "BYTES",
    "BOOL",
    "BF16",
    "FP16",
    "UINT64",
    [],
    {},
    [[]],
    [None],
    [1, "a"],
    [[1], 2],
    [2**63, 0],
    [0, 2**64],
    [1] * 40,
    [-1],
    [True],
    {"binary_data_size": -1},
    {"binary_data_size": 2**40},
    {"binary_data_size": 4},
    {"binary_data": "x"},
    {"classification": 1},
    {"signature": ["a"]},
    [[[[[[[[[[[[[[[[1.0]]]]]]]]]]]]]]]],
]


def _seeds() -> list[dict[str, Any]]:
    return [
        {
            "id": "r",
            "parameters": {"binary_data_output": True, "signature": "s"},
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0], [3, 4]]},
                {"name": "w", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]},
                {"name": "b", "datatype": "BOOL", "shape": [1], "data": [True]},
                {"name": "h", "datatype": "BF16", "shape": [1], "data": [0.5]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        },
        {"inputs": [{"name": "n", "datatype": "UINT8", "shape": [3], "data": [0, 1, 255]}]},
    ]


def _places(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _places(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _places(value, (*path, i))


def _mutate(document: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        places = [p for p in _places(document) if p]
        if not places:
            break
        path = rng.choice(places)
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        choice = rng.random()
        if choice < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif choice < 0.25 and isinstance(parent, dict):
            key = rng.choice(["data", "shape", "parameters", "datatype", "x"])
            parent[key] = copy.deepcopy(rng.choice(_HOSTILE))
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(_HOSTILE))
    return document


def _binary_body(rng: random.Random) -> tuple[bytes, int | None]:
    x = np.arange(6, dtype=np.float32)
    words = b"\x01\0\0\0a\x02\0\0\0bc"
    inputs = [
        {
            "name": "x",
            "datatype": "FP32",
            "shape": [2, 3],
            "parameters": {"binary_data_size": x.nbytes},
        },
        {"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}},
    ]
    document = _mutate({"inputs": inputs}, rng) if rng.random() < 0.7 else {"inputs": inputs}
    head = json.dumps(document).encode()
    body = head + x.tobytes() + words
    length: int | None = len(head)
    roll = rng.random()
    if roll < 0.2:
        length = rng.choice([None, 0, -1, 1, len(head) - 1, len(head) + 1, len(body) + 5])
    elif roll < 0.4:
        body = body[: rng.randint(0, len(body))]
    elif roll < 0.5:
        i = rng.randrange(len(body))
        body = body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :]
    return body, length


def test_decode_request_is_total() -> None:
    from asynchub._serving.oip import InferRequest, decode_request
    from asynchub.errors import ProtocolError

    rng = random.Random(23)
    statuses: dict[int, int] = {}
    for i in range(4000):
        if i % 4 == 3:
            body, length = _binary_body(rng)
        else:
            document: Any = _mutate(rng.choice(_seeds()), rng)
            body, length = json.dumps(document).encode(), None
            if rng.random() < 0.2:  # bytes a JSON writer would not make
                cut = rng.randrange(len(body))
                body = (
                    body[:cut] + rng.choice([b"\xff", b"NaN", b"]", b"\\ud800", b""]) + body[cut:]
                )
        outcome: InferRequest | ProtocolError
        try:
            outcome = decode_request(body, length)
        except ProtocolError as exc:
            outcome = exc
        except Exception as exc:  # pragma: no cover - what the test is for
            raise AssertionError(f"{type(exc).__name__}: {exc} for {body[:300]!r}") from exc
        if isinstance(outcome, ProtocolError):
            assert 400 <= outcome.status < 500, (outcome.status, outcome.message, body[:300])
            # Each refusal says what is wrong: none fell through to the last resort.
            assert "cannot be decoded" not in outcome.message, (outcome.message, body[:300])
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        else:
            assert isinstance(outcome, InferRequest)
            statuses[200] = statuses.get(200, 0) + 1
    assert statuses.get(200) and statuses.get(400), statuses  # both kinds were reached


# -- on a real server: HTTP to the letter -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("tensorflow")
    flags = ["--max-input-size", "32MiB"]
    with spawn_server(tmp_path_factory.mktemp("malformed"), flags) as running:
        yield running


@pytest.fixture(scope="module")
def web(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _error(answer: httpx.Response, status: int) -> str:
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "application/json", answer.headers
    message: str = answer.json()["error"]
    return message


def test_the_500s_of_the_review_are_400s(web: httpx.Client) -> None:
    deep = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert "too deep" in _error(web.post("/v2/models/wide/infer", content=deep), 400)
    huge = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**63, 0], "data": []}]}
    assert "rows" in _error(web.post("/v2/models/wide/infer", json=huge), 413)
    lone = b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 1], "data": ["\\ud800"]}]}'
    assert "Unicode" in _error(web.post("/v2/models/words/infer", content=lone), 400)
    # The same connection still serves.
    fine = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]}
    assert web.post("/v2/models/wide/infer", json=fine).status_code == 200


def test_methods_follow_rfc_9110(web: httpx.Client) -> None:
    refused = web.get("/v2/models/wide/infer")
    assert "POST" in _error(refused, 405)
    assert refused.headers["allow"] == "POST"
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/wide"):
        put = web.put(path, content=b"{}")
        assert "GET" in _error(put, 405), path
        assert put.headers["allow"] == "GET, HEAD", path
        got, head = web.get(path), web.head(path)
        assert got.status_code == head.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-length"] == got.headers["content-length"], path
    assert web.head("/v2/models/wide/infer").headers["allow"] == "POST"


def test_the_binary_header_length_is_digits_only(web: httpx.Client) -> None:
    x = np.ones((1, 1), np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    for bad in ("+%d", "%d.0", "0x%x", "-%d"):
        answer = web.post(
            "/v2/models/wide/infer",
            content=head + x.tobytes(),
            headers={"Inference-Header-Content-Length": bad % len(head)},
        )
        assert "Inference-Header-Content-Length" in _error(answer, 400), bad
    ok = web.post(
        "/v2/models/wide/infer",
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert ok.status_code == 200, ok.text


def test_max_input_size_is_the_option_given(web: httpx.Client) -> None:
    answer = web.post("/v2/models/wide/infer", content=b" " * ((32 << 20) + 1))
    assert "at most 33554432" in _error(answer, 413)
