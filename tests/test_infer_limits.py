"""``asynchub serve --infer`` bounds every request, and one big request does not stall the others.

A real server (``python -m asynchub serve ROOT --infer``) on 127.0.0.1 is sent what a
careless or hostile client sends: a shape of 2**26 rows beside a zero, a gzip bomb, a
body longer than the limit (declared, or chunked), bodies that trickle in a byte at a
time. Each is refused in the protocol's shape (``{"error": ...}``) before the memory is
spent. While a 20 MB JSON request, a 5 MB binary BYTES request or a big JSON answer is
being handled, the health check still answers at once.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from . import _savedmodels
from ._procs import start_serve

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

#: The body timeout of the server here: short, so that the trickling test is quick.
_BODY_TIMEOUT = 4.0


# -- a server, and models that echo what they are given ---------------------------------------


def echo_modules(root: Path) -> Path:
    """``wide``: ``y = x`` on ``float32[?, ?]``; ``words``: ``y = x`` on ``string[?, ?]``."""
    import tensorflow as tf

    for name, dtype in (("wide", tf.float32), ("words", tf.string)):
        module = tf.Module()
        fn = tf.function(
            lambda x: {"y": tf.identity(x)},
            input_signature=[tf.TensorSpec([None, None], dtype, name="x")],
        )
        tf.saved_model.save(
            module,
            str(root / name / "1"),
            signatures={"serving_default": fn.get_concrete_function()},
        )
    _savedmodels.fruit_module(root / "fruit" / "1")
    return root


@dataclass
class Server:
    url: str  # http://host:port
    host: str
    port: int
    log: list[str]


@contextlib.contextmanager
def spawn_server(base: Path, flags: list[str]) -> Iterator[Server]:
    """``asynchub serve ROOT --infer FLAGS`` on a free port, with the echo models preloaded."""
    root = echo_modules(base / "models")
    served = start_serve(base, root, "--preload", *flags)
    try:
        host, port = served.address.rsplit(":", 1)
        yield Server(served.base, host, int(port), served.log)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("tensorflow")
    flags = ["--body-timeout", str(_BODY_TIMEOUT)]
    with spawn_server(tmp_path_factory.mktemp("limits"), flags) as running:
        yield running


@pytest.fixture(scope="module")
def web(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _json_input(shape: list[int], data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}


def _refused(answer: httpx.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    assert answer.headers["content-type"] == "application/json"
    message: str = answer.json()["error"]
    for word in words:
        assert word in message, message
    return message


def _raw(server: Server, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``request`` on a new connection; what comes back until the server closes it."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close mid-way
            sock.sendall(request)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer


def _status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


# -- options, no server ------------------------------------------------------------------------


def test_limit_options_are_checked(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from asynchub._cli.serve import _Size
    from asynchub.cli import main
    from asynchub.server import InferOptions

    size = _Size()
    assert size.convert("64MiB", None, None) == 64 << 20
    assert size.convert("500kB", None, None) == 500_000
    assert size.convert("1234", None, None) == 1234
    for bad in ("x", "0", "-5", "1.5MiB", "12 parsecs"):
        result = CliRunner().invoke(
            main, ["serve", str(tmp_path), "--infer", "--max-input-size", bad]
        )
        assert result.exit_code == 2 and "size in bytes" in result.output, (bad, result.output)
    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--body-timeout", "5"])
    assert result.exit_code == 2 and "--body-timeout only apply with --infer" in result.output
    for wrong in ({"max_input_size": 0}, {"max_request_rows": True}, {"body_timeout": 0.0}):
        with pytest.raises(ValueError, match=next(iter(wrong))):
            InferOptions(**wrong)


def test_big_answers_are_written_in_pieces_that_tritonclient_reads() -> None:
    http = pytest.importorskip("tritonclient.http")
    from asynchub._serving.oip import encode_parts

    big = np.arange(70_000, dtype=np.float32).reshape(2, 35_000)  # more than one piece
    empty = np.zeros((0, 3), np.float32)
    words = np.array([b"a", b"bc"], dtype=object)
    outputs = [("big", big, False), ("empty", empty, True), ("words", words, True)]
    parts, head = encode_parts("m", "1", "r", outputs)
    assert len(parts) > 1 and head is not None  # not joined
    result = http.InferResult.from_response_body(b"".join(parts), header_length=head)
    np.testing.assert_array_equal(result.as_numpy("big"), big)
    assert result.as_numpy("empty").shape == (0, 3)
    assert list(result.as_numpy("words")) == [b"a", b"bc"]
    assert result.get_response()["id"] == "r"


# -- limits -----------------------------------------------------------------------------------


def test_rows_are_capped_even_beside_a_zero(web: httpx.Client) -> None:
    # 127 bytes asked a [?, ?] model for 2**26 rows of nothing: 256 MiB of answer.
    body = _json_input([1 << 26, 0], [])
    _refused(web.post("/v2/models/wide/infer", json=body), 413, "rows", "--max-request-rows")
    many = _json_input([100, 1 << 20], [])  # no rows past the limit, but 100 Mi values
    _refused(web.post("/v2/models/wide/infer", json=many), 413, "--max-request-elements")
    fine = web.post("/v2/models/wide/infer", json=_json_input([1000, 0], []))
    assert fine.status_code == 200, fine.text
    assert fine.json()["outputs"][0]["shape"] == [1000, 0]


def test_a_gzip_bomb_stops_at_max_input_size(web: httpx.Client) -> None:
    bomb = gzip.compress(b" " * (100 << 20), 9)  # 100 MiB of spaces: valid JSON padding
    assert len(bomb) < 200_000
    answer = web.post("/v2/models/wide/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    _refused(answer, 413, "inflates", "--max-input-size")
    small = gzip.compress(json.dumps(_json_input([1, 2], [1.0, 2.0])).encode())
    answer = web.post("/v2/models/wide/infer", content=small, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.0, 2.0]
    cut = web.post(
        "/v2/models/wide/infer", content=small[:-8], headers={"Content-Encoding": "gzip"}
    )
    _refused(cut, 400, "cut short")


def test_a_declared_length_over_the_limit_is_refused_unread(server: Server) -> None:
    # Nothing of the 200 MiB is sent: the answer comes from the headers alone.
    head = (
        b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n"
    )
    answer = _raw(server, head, timeout=10)
    assert _status_line(answer) == "HTTP/1.1 413 Request Entity Too Large", answer[:300]
    assert b"connection: close" in answer.lower()
    assert b'"error":' in answer and b"--max-input-size" in answer


def test_a_chunked_body_is_counted_as_it_comes(server: Server) -> None:
    head = b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b" " * (1 << 20)
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sent = 0
        with contextlib.suppress(OSError):  # the server closes once it has answered
            sock.sendall(head)
            for _ in range(80):  # 80 MiB, past the 64 MiB limit
                sock.sendall(chunk)
                sent += 1
            sock.sendall(b"0\r\n\r\n")
        answer = _read_all(sock)
    assert _status_line(answer) == "HTTP/1.1 413 Request Entity Too Large", answer[:300]
    assert b"more than 67108864 bytes" in answer


def test_bodies_that_trickle_in_are_cut_off(server: Server, web: httpx.Client) -> None:
    # 20 connections each send a byte every 2 s: each would hold its connection (and its
    # buffer) forever. They get 408 once --body-timeout has passed since the body began.
    head = (
        b"POST /v2/models/fruit/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    socks = [socket.create_connection((server.host, server.port), timeout=30) for _ in range(20)]
    answers: dict[int, bytes] = {}
    started = time.monotonic()
    try:
        for sock in socks:
            sock.sendall(head)
            sock.setblocking(False)
        while len(answers) < len(socks) and time.monotonic() - started < 20:
            for i, sock in enumerate(socks):
                if i in answers:
                    continue
                with contextlib.suppress(OSError):
                    sock.send(b" ")
                try:
                    got = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    got = b""
                answers[i] = got
            time.sleep(2 if len(answers) < len(socks) else 0)
        took = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert len(answers) == len(socks), f"{len(socks) - len(answers)} still held after {took:.0f}s"
    assert took < _BODY_TIMEOUT + 6, took
    for got in answers.values():
        assert got == b"" or _status_line(got) == "HTTP/1.1 408 Request Timeout", got[:300]
    assert sum(b"--body-timeout" in got for got in answers.values()) >= 1
    assert web.get("/v2/health/live").json() == {"live": True}


def test_a_body_under_the_limit_in_small_pieces_is_whole(server: Server) -> None:
    # Read into one buffer as it comes: the chunks must land in order, nothing lost.
    x = np.arange(3000, dtype=np.float32).reshape(3, 1000)
    document = json.dumps(_json_input([3, 1000], x.tolist())).encode()

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(document), 997):
            yield document[start : start + 997]

    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post("/v2/models/wide/infer", content=pieces())  # chunked
        fixed = client.post("/v2/models/wide/infer", content=document)
    for got in (answer, fixed):
        assert got.status_code == 200, got.text[:300]
        np.testing.assert_array_equal(got.json()["outputs"][0]["data"], x.ravel())


# -- the event loop stays free ----------------------------------------------------------------

#: The worst wait for /v2/health/live allowed while a big request is handled (generous:
#: 2 shared cores; it was 887 ms behind a 20 MB JSON request when the loop was held).
_HEALTH_BOUND = 0.25


def _worst_health_wait(server: Server, work: Any) -> tuple[float, Any]:
    """Run ``work()`` while /v2/health/live is polled; the slowest answer, and what
    ``work`` returned."""
    waits: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get("/v2/health/live").status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.1)
        result = work()
    finally:
        done.set()
        poller.join(30)
    assert len(waits) > 5
    return max(waits), result


def test_a_big_json_request_and_answer_leave_the_loop_free(server: Server) -> None:
    x = np.random.default_rng(0).random((64, 16_000), dtype=np.float32).round(5)
    document = json.dumps(_json_input([64, 16_000], x.tolist())).encode()
    assert len(document) > 15_000_000

    def work() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return client.post("/v2/models/wide/infer", content=document)

    work()  # the worker process starts once
    worst, answer = _worst_health_wait(server, work)
    assert answer.status_code == 200, answer.text[:300]
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"], np.float32), x.ravel())
    print(f"health waited at most {worst * 1000:.0f} ms behind {len(document) / 1e6:.0f} MB JSON")
    assert worst < _HEALTH_BOUND, worst


def test_a_big_binary_bytes_request_leaves_the_loop_free(server: Server) -> None:
    words = np.array([b"w%05d" % (i % 99_999) for i in range(64 * 8000)], dtype=object)
    words = words.reshape(64, 8000)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [64, 8000],
                    "parameters": {"binary_data_size": 10 * words.size},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    data = b"".join(len(w).to_bytes(4, "little") + w for w in words.ravel())
    body = head + data
    assert len(body) > 5_000_000

    def work() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return client.post(
                "/v2/models/words/infer",
                content=body,
                headers={"Inference-Header-Content-Length": str(len(head))},
            )

    worst, answer = _worst_health_wait(server, work)
    assert answer.status_code == 200, answer.text[:300]
    length = int(answer.headers["inference-header-content-length"])
    assert answer.content[length:] == data  # the same strings back, as binary
    print(f"health waited at most {worst * 1000:.0f} ms behind {len(body) / 1e6:.0f} MB BYTES")
    # More room here: TensorFlow itself holds the GIL ~50 ms making a tensor of 512,000
    # strings and again taking it back, in the model's worker thread (346 ms before).
    assert worst < _HEALTH_BOUND + 0.05, worst


def test_a_big_json_answer_leaves_the_loop_free(server: Server) -> None:
    # A binary request (4 MB) whose answer is 1 M values of JSON (~20 MB).
    x = np.random.default_rng(1).random((64, 16_000), dtype=np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        }
    ).encode()

    def work() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return client.post(
                "/v2/models/wide/infer",
                content=head + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(head))},
            )

    worst, answer = _worst_health_wait(server, work)
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.content) > 15_000_000
    np.testing.assert_array_equal(
        np.array(answer.json()["outputs"][0]["data"], np.float32), x.ravel()
    )
    size = len(answer.content) / 1e6
    print(f"health waited at most {worst * 1000:.0f} ms behind a {size:.0f} MB answer")
    assert worst < _HEALTH_BOUND, worst
