"""``asynchub serve --infer``: the Open Inference Protocol, spoken to by the real clients.

One server process per module, started as users start it (``python -m asynchub serve
ROOT --infer``) on 127.0.0.1, is called with ``tritonclient.http`` and
``tritonclient.http.aio``. The protocol's pure logic is tested without a server.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from . import _savedmodels
from ._procs import start_serve, stop_cleanly

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
http = pytest.importorskip("tritonclient.http")
aio = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Seconds the server may take to start (it imports TensorFlow before it listens).
_START_TIMEOUT = 120
#: Rows that may wait per model and signature before the server answers 503.
_MAX_QUEUE = 16
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)


# -- pure logic, no server --------------------------------------------------------------------


def test_model_paths() -> None:
    from asynchub._serving.oip import parse_model_path

    assert parse_model_path("digits") == ("digits", None, "metadata")
    assert parse_model_path("digits/ready") == ("digits", None, "ready")
    assert parse_model_path("digits/versions/1/infer") == ("digits", "1", "infer")
    assert parse_model_path("google/mnist/versions/3") == ("google/mnist", "3", "metadata")
    assert parse_model_path("google/mnist/infer") == ("google/mnist", None, "infer")
    for bad in ["", "infer", "a/../b/infer", ".hidden", "a//b", "a/versions/.x/infer", "a\\b"]:
        assert parse_model_path(bad) is None, bad


def test_latest_version_prefers_numbers(tmp_path: Path) -> None:
    from asynchub._serving.repository import ModuleSource, latest, versions

    for version in ["2", "10", "beta"]:
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "saved_model.pb").write_bytes(b"graph")
    found = versions(tmp_path.resolve(), "m")
    assert [s.version for s in found] == ["2", "10", "beta"]
    assert latest(found) == "10"
    assert latest([ModuleSource("m", "a", tmp_path, False)]) == "a"
    assert latest([]) is None


def _request(inputs: list[Any], binary: bool) -> tuple[bytes, int | None]:
    """A request body as tritonclient makes it (its own private helper, the real bytes)."""
    from tritonclient.http._utils import _get_inference_request

    return _get_inference_request(inputs, "", None, 0, False, False, 0, None, None)  # type: ignore[no-any-return]


def _input(name: str, array: np.ndarray[Any, Any], binary: bool = True) -> Any:
    from tritonclient.utils import np_to_triton_dtype

    tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    return tensor.set_data_from_numpy(array, binary_data=binary)


@pytest.mark.parametrize("binary", [True, False])
def test_decode_what_tritonclient_sends(binary: bool) -> None:
    from asynchub._serving.oip import decode_request

    words = np.array([b"a", b"bc", "d\u00e9".encode()], dtype=object)
    inputs = [
        _input("x", X, binary),
        _input("n", np.array([[1], [-2]], np.int64), binary),
        _input("ok", np.array([True, False]), binary),
        _input("w", words, binary),
    ]
    body, header = _request(inputs, binary)
    assert (header is not None) == binary
    decoded = decode_request(body, header)
    assert decoded.binary_output  # no outputs named: tritonclient asks for binary ones
    got = {t.name: t for t in decoded.inputs}
    np.testing.assert_array_equal(got["x"].array, X)
    assert got["x"].array.dtype == np.float32 and got["x"].datatype == "FP32"
    np.testing.assert_array_equal(got["n"].array, [[1], [-2]])
    assert got["n"].array.dtype == np.int64
    np.testing.assert_array_equal(got["ok"].array, [True, False])
    assert list(got["w"].array) == list(words)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "no list of inputs"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}', "neither data"),
        (b'{"inputs": [{"name": "x", "datatype": "FP9", "shape": [1], "data": [1]}]}', "FP9"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', "shape"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1]}]}', "needs 3"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}', "range"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}', "INT32"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], 2]}]}', "x"),
        (b'{"inputs": [], "parameters": {"signature": 3}}', "signature"),
    ],
)
def test_decode_refuses_with_a_reason(document: bytes, message: str) -> None:
    from asynchub._serving.oip import decode_request
    from asynchub.errors import ProtocolError

    with pytest.raises(ProtocolError, match=message) as caught:
        decode_request(document, None)
    assert caught.value.status == 400


def test_decode_checks_the_binary_sizes() -> None:
    from asynchub._serving.oip import decode_request
    from asynchub.errors import ProtocolError

    body, header = _request([_input("x", X)], True)
    assert header is not None
    with pytest.raises(ProtocolError, match=r"'x'.*past the body's end"):  # cut short
        decode_request(body[:-4], header)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 20},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match=r"'x'.*needs 24 bytes"):  # one value short
        decode_request(head + X.tobytes()[:20], len(head))
    with pytest.raises(ProtocolError, match="after the inputs"):
        decode_request(body + b"junk", header)
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        decode_request(body, len(body) + 1)


@pytest.mark.parametrize("binary", [True, False])
def test_encode_is_what_tritonclient_reads(binary: bool) -> None:
    from asynchub._serving.oip import encode_response

    outputs = [
        ("y", X * 2, binary),
        ("n", np.array([7, 8], np.int32), binary),
        ("s", np.array([b"x", b"yz"], dtype=object), binary),
    ]
    body, header = encode_response("m", "3", "req-1", outputs)
    result = http.InferResult.from_response_body(body, header_length=header)
    assert result.get_response()["model_name"] == "m"
    assert result.get_response()["model_version"] == "3"
    assert result.get_response()["id"] == "req-1"
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)
    assert result.as_numpy("y").dtype == np.float32
    np.testing.assert_array_equal(result.as_numpy("n"), [7, 8])
    got = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("s")]
    assert got == [b"x", b"yz"]


# -- models and the server --------------------------------------------------------------------


def _fixed_module(path: Path) -> Path:
    """``y = 3 * x`` on a ``float32[3]`` input: no batch dimension, so never batched."""
    import tensorflow as tf

    module = tf.Module()
    fn = tf.function(
        lambda x: {"y": 3.0 * x}, input_signature=[tf.TensorSpec([3], tf.float32, name="x")]
    )
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": fn.get_concrete_function()}
    )
    return path


def _slow_module(path: Path) -> Path:
    """``y = x`` on ``float32[?]``, after ~0.1 s of matrix products (whatever the rows)."""
    import tensorflow as tf

    def slow(x: Any) -> Any:
        a = tf.eye(192) * 0.5

        def body(i: Any, a: Any) -> Any:
            return i + 1, tf.matmul(a, a) + tf.eye(192) * 0.5

        _, a = tf.while_loop(lambda i, _: i < 400, body, (tf.constant(0), a))
        return {"y": x + 0.0 * tf.reduce_sum(a)}

    module = tf.Module()
    fn = tf.function(slow, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": fn.get_concrete_function()}
    )
    return path


def build_root(root: Path) -> Path:
    """ROOT with directories and an archive, several versions, and special models."""
    from asynchub._pack import pack

    _savedmodels.fruit_module(root / "fruit" / "1")
    shutil.copytree(root / "fruit" / "1", root / "lazy" / "1")  # loaded by one test only
    _savedmodels.signatures_module(root / "add" / "2", ["serving_default"])  # x + 0
    staged = _savedmodels.signatures_module(root.parent / "add10", ["a", "serving_default"])
    pack(staged, root / "add" / "10.tar.gz")  # x + 1; 10 is the latest, not 2
    _fixed_module(root / "fixed" / "1")
    _slow_module(root / "slow" / "1")
    return root


@dataclass
class Server:
    url: str  # host:port, as tritonclient takes it
    log: list[str]

    def loads(self, name: str) -> int:
        return sum(f"loaded model {name} version" in line for line in self.log)


@pytest.fixture(scope="module")
def infer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("tensorflow")
    base = tmp_path_factory.mktemp("infer")
    root = base / "models"
    root.mkdir()
    # Modules load on first use, so they are built while the server imports TensorFlow.
    served = start_serve(base, root, "--max-queue", str(_MAX_QUEUE), build=build_root)
    try:
        yield Server(served.address, served.log)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def client(infer_server: Server) -> Iterator[Any]:
    with http.InferenceServerClient(infer_server.url, network_timeout=60.0) as c:
        yield c


def _status(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_health_and_server_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "asynchub"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: Any) -> None:
    meta = client.get_model_metadata("fruit")
    assert meta["name"] == "fruit"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [
        {"name": "default", "datatype": "FP32", "shape": [-1]},
        {"name": "extra", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert meta["parameters"]["signatures"] == ["default", "fruit_to_pet"]
    other = client.get_model_metadata("fruit", query_params={"signature": "fruit_to_pet"})
    assert [t["name"] for t in other["inputs"]] == ["apples", "oranges"]
    versioned = client.get_model_metadata("add", "2")
    assert versioned["versions"] == ["2", "10"]  # numeric order; an archive and a directory
    assert client.is_model_ready("fruit")
    assert client.is_model_ready("add", "10")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("add", "3")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer(client: Any, binary: bool) -> None:
    result = client.infer(
        "fruit",
        [_input("x", X, binary)],
        outputs=[http.InferRequestedOutput(n, binary_data=binary) for n in ("default", "extra")],
        request_id="r1",
    )
    np.testing.assert_allclose(result.as_numpy("default"), X.sum(axis=1) * 2)
    np.testing.assert_allclose(result.as_numpy("extra"), X + 1)
    response = result.get_response()
    assert response["id"] == "r1"
    assert (response["model_name"], response["model_version"]) == ("fruit", "1")
    assert ("data" in response["outputs"][0]) == (not binary)
    # Only the output asked for comes back.
    only = client.infer(
        "fruit", [_input("x", X, binary)], outputs=[http.InferRequestedOutput("extra")]
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["extra"]


def test_infer_with_and_without_a_version(client: Any) -> None:
    x = np.array([1.0, 2.0], np.float32)
    latest = client.infer("add", [_input("x", x)])
    assert latest.get_response()["model_version"] == "10"  # an archive, extracted into the cache
    np.testing.assert_allclose(latest.as_numpy("output"), x + 1)
    older = client.infer("add", [_input("x", x)], model_version="2")
    assert older.get_response()["model_version"] == "2"
    np.testing.assert_allclose(older.as_numpy("output"), x)


def test_multi_input_signature_by_parameter(client: Any) -> None:
    apples, oranges = np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)
    result = client.infer(
        "fruit",
        [_input("apples", apples), _input("oranges", oranges, binary=False)],  # both ways mixed
        parameters={"signature": "fruit_to_pet"},
    )
    np.testing.assert_allclose(result.as_numpy("cats"), apples + oranges)
    np.testing.assert_allclose(result.as_numpy("dogs"), apples * oranges * 2)


def test_an_unbatchable_signature_runs_alone(client: Any) -> None:
    x = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_allclose(client.infer("fixed", [_input("x", x)]).as_numpy("y"), 3 * x)


def test_unknown_model_or_version_is_404(client: Any) -> None:
    x = [_input("x", X)]
    status, message = _status(lambda: client.infer("nope", x))
    assert status == "404" and "nope" in message
    status, message = _status(lambda: client.infer("fruit", x, model_version="7"))
    assert status == "404" and "'7'" in message and "it has: 1" in message
    assert _status(lambda: client.get_model_metadata("nope"))[0] == "404"
    assert _status(lambda: client.get_model_metadata("add", "3"))[0] == "404"


def test_requests_that_do_not_bind_are_400_naming_the_input(client: Any) -> None:
    cases = {
        "shape": (lambda: client.infer("fruit", [_input("x", X[:, :2])]), ["'x'", "[-1, 3]"]),
        "dtype": (
            lambda: client.infer("fruit", [_input("x", X.astype(np.int32))]),
            ["'x'", "FP32"],
        ),
        "missing": (
            lambda: client.infer(
                "fruit", [_input("apples", X[0])], parameters={"signature": "fruit_to_pet"}
            ),
            ["'oranges'", "missing"],
        ),
        "unknown": (
            lambda: client.infer("fruit", [_input("x", X), _input("pears", X)]),
            ["'pears'"],
        ),
        "rows": (  # the inputs bind alone, but not together: still the client's fault
            lambda: client.infer(
                "fruit",
                [_input("apples", X[0]), _input("oranges", X[0, :2])],
                parameters={"signature": "fruit_to_pet"},
            ),
            ["fruit_to_pet"],
        ),
        "signature": (
            lambda: client.infer("fruit", [_input("x", X)], parameters={"signature": "pets"}),
            ["'pets'", "fruit_to_pet"],
        ),
        "output": (
            lambda: client.infer(
                "fruit", [_input("x", X)], outputs=[http.InferRequestedOutput("cats")]
            ),
            ["'cats'"],
        ),
    }
    for case, (call, words) in cases.items():
        status, message = _status(call)
        assert status == "400", (case, message)
        for word in words:
            assert word in message, (case, message)
    # Still serving.
    np.testing.assert_allclose(client.infer("fruit", [_input("x", X)]).as_numpy("extra"), X + 1)


def test_plain_json_as_curl_sends_it(infer_server: Server) -> None:
    with httpx.Client(base_url=f"http://{infer_server.url}", timeout=60) as web:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()}]}
        answer = web.post("/v2/models/fruit/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["extra"] == {
            "name": "extra",
            "datatype": "FP32",
            "shape": [2, 3],
            "data": (X + 1).ravel().tolist(),
        }
        bad = web.post("/v2/models/fruit/infer", content=b"{not json")
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        assert web.get("/v2/models/fruit/infer").status_code == 405
        assert web.get("/v2/health/live").json() == {"live": True}
        # The module host is still there.
        assert web.get("/fruit/1?tf-hub-format=compressed").status_code == 200


def test_overload_is_503_and_nothing_hangs(infer_server: Server) -> None:
    statuses: list[str] = []
    refusals: list[str] = []

    async def main() -> None:
        async with aio.InferenceServerClient(infer_server.url, conn_timeout=120) as c:

            async def one() -> None:
                try:
                    await c.infer("slow", [_input("x", np.ones(1, np.float32))])
                    statuses.append("200")
                except InferenceServerException as exc:
                    statuses.append(str(exc.status()))
                    refusals.append(exc.message())

            await c.infer("slow", [_input("x", np.ones(1, np.float32))])  # loaded
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for _ in range(150):
                        tg.start_soon(one)

    anyio.run(main)
    assert len(statuses) == 150
    assert set(statuses) == {"200", "503"}, refusals
    assert all("overloaded" in message for message in refusals), refusals


def test_concurrent_first_requests_load_the_model_once(infer_server: Server) -> None:
    assert infer_server.loads("lazy") == 0
    results: list[Any] = []

    async def main() -> None:
        async with aio.InferenceServerClient(infer_server.url, conn_timeout=120) as c:

            async def one(i: int) -> None:
                result = await c.infer("lazy", [_input("x", X[:1] + i)])
                results.append((i, result.as_numpy("extra")))

            async with anyio.create_task_group() as tg:
                for i in range(12):  # fewer rows than max_queue: none is refused
                    tg.start_soon(one, i)

    anyio.run(main)
    assert len(results) == 12
    for i, extra in results:
        np.testing.assert_allclose(extra, X[:1] + i + 1)
    assert infer_server.loads("lazy") == 1, "".join(infer_server.log)


# -- in process: --no-batching ------------------------------------------------------------------


@pytest.fixture
def unfreeze() -> Iterator[None]:
    """The server freezes the garbage collector after a load; the test process thaws it."""
    yield
    gc.unfreeze()


@pytest.mark.anyio
@pytest.mark.usefixtures("unfreeze")
async def test_unbatched_app_in_process(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from asynchub.server import InferOptions, create_app

    _savedmodels.fruit_module(tmp_path / "fruit" / "1")
    app = create_app(tmp_path, infer=InferOptions(batching=False, max_queue=2))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as web,
    ):
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()}]}
        answers: list[httpx.Response] = []

        async def one() -> None:
            answers.append(await web.post("/v2/models/fruit/infer", json=body))

        await one()  # loads it
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(one)
    codes = sorted(a.status_code for a in answers)
    # One request of 2 rows is in flight at a time (max_queue=2); the others are refused.
    assert codes[0] == 200 and codes[-1] == 503, [a.text for a in answers]
    assert set(codes) == {200, 503}
    ok = next(a for a in answers if a.status_code == 200)
    assert json.loads(ok.content)["outputs"][1]["data"] == (X + 1).ravel().tolist()
    refused = [a for a in answers if a.status_code == 503]
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        assert "in flight" in answer.json()["error"]


def test_infer_options_need_infer(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from asynchub.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--preload", "--max-queue", "3"])
    assert result.exit_code == 2
    assert "--preload, --max-queue only apply with --infer" in result.output


@pytest.mark.anyio
@pytest.mark.usefixtures("unfreeze")
async def test_batching_joins_the_decoded_arrays_with_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each request's input stays the numpy array it was decoded into: no TensorFlow op
    # per request; a batch is one np.concatenate, converted once by the call.
    pytest.importorskip("tensorflow")
    from asynchub import _batching
    from asynchub.server import InferOptions, create_app

    joined: list[list[type]] = []
    original = _batching.join

    def spy(payloads: list[Any], tf: Any) -> Any:
        joined.append([type(p) for p in payloads])
        return original(payloads, tf)

    monkeypatch.setattr(_batching, "join", spy)
    _savedmodels.fruit_module(tmp_path / "fruit" / "1")
    app = create_app(tmp_path, infer=InferOptions(max_delay=0.05))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as web,
    ):
        answers: dict[int, httpx.Response] = {}

        async def one(i: int) -> None:
            rows = X[:1] + i
            body = {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": rows.tolist()}
                ]
            }
            answers[i] = await web.post("/v2/models/fruit/infer", json=body)

        await one(0)  # loads it, and teaches the batcher the row's form
        await one(0)
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    for i, answer in answers.items():
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["extra"] == (X[:1] + i + 1).ravel().tolist()
    assert joined and all(kinds == [np.ndarray] * len(kinds) for kinds in joined), joined


def test_pure_python_loop_and_parser_serve_too(tmp_path: Path) -> None:
    # uvloop and httptools are what `auto` takes when installed; the pure-Python event
    # loop and HTTP parser must answer the same, and a choice that is not one fails.
    pytest.importorskip("tensorflow")
    from click.testing import CliRunner

    from asynchub.cli import main

    refused = CliRunner().invoke(main, ["serve", str(tmp_path), "--loop", "tokio"])
    assert refused.exit_code == 2 and "tokio" in refused.output
    _savedmodels.fruit_module(tmp_path / "fruit" / "1")
    env = {
        **os.environ,
        "TFHUB_CACHE_DIR": str(tmp_path / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "asynchub", "serve", str(tmp_path), "--infer", "--preload"]
    command += ["--port", "0", "--no-access-log", "--loop", "asyncio", "--http", "h11"]
    proc = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    log: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "Uvicorn running on" in line:
                found.set()
        found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(_START_TIMEOUT) and proc.poll() is None, "".join(log)
        address = re.search(r"Uvicorn running on (http://\S+)", "".join(log))
        assert address is not None, "".join(log)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()}]}
        answer = httpx.post(f"{address.group(1)}/v2/models/fruit/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["extra"] == (X + 1).ravel().tolist()
    finally:
        stop_cleanly(proc, reader, log)
