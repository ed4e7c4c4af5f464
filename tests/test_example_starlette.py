"""examples/starlette_app.py, end to end: a real uvicorn process on 127.0.0.1, talked to
with httpx, serving a SavedModel the test builds."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from . import _savedmodels
from ._procs import stop_cleanly

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: Seconds the server may take to import TensorFlow and load the module.
_START_TIMEOUT = 180

pytestmark = [pytest.mark.tf, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    root = tmp_path_factory.mktemp("example")
    module = _savedmodels.fruit_module(root / "fruit")  # callable: x -> 2 * x on float32[?, 3]
    env = {
        **os.environ,
        "ASYNCHUB_EXAMPLE_MODULE": str(module),
        "TFHUB_CACHE_DIR": str(root / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES)]
    command += ["starlette_app:app", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        command, cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url = None
        while url is None:
            try:
                line = lines.get(timeout=_START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"the example did not start in {_START_TIMEOUT}s:\n{''.join(log)}")
            if line is None:
                pytest.fail(f"the example exited {proc.wait()}:\n{''.join(log)}")
            log.append(line)
            if "Uvicorn running on " in line:  # printed once the lifespan start-up is done
                url = line.split("Uvicorn running on ", 1)[1].split()[0]
        yield url
    finally:
        stop_cleanly(proc, reader, log)


def test_concurrent_requests_get_their_own_rows(base_url: str) -> None:
    import httpx

    rng = random.Random(5)
    requests = [
        [[rng.uniform(-9, 9) for _ in range(3)] for _ in range(rng.randint(1, 5))]
        for _ in range(200)
    ]
    answers: dict[int, Any] = {}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def one(i: int) -> None:
                response = await client.post("/predict", json={"inputs": requests[i]})
                assert response.status_code == 200, response.text
                answers[i] = response.json()["outputs"]

            async with anyio.create_task_group() as tg:
                for i in range(len(requests)):
                    tg.start_soon(one, i)

    anyio.run(main)
    for i, rows in enumerate(requests):
        np.testing.assert_allclose(answers[i], 2 * np.array(rows, np.float32), rtol=1e-6)


def test_bad_requests_are_answered_with_reasons(base_url: str) -> None:
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as client:
        about = client.get("/").json()
        assert about["handle"].endswith("fruit")
        assert "fruit_to_pet" in about["signatures"]
        wrong_size = client.post("/predict", json={"inputs": [[1.0, 2.0]]})
        assert wrong_size.status_code == 422
        assert "does not accept a float32[1, 2] tensor" in wrong_size.json()["error"]
        assert client.post("/predict", content=b"not json").status_code == 400
        assert client.post("/predict", json={"rows": []}).status_code == 400
        # The server is not disturbed by them.
        ok = client.post("/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
        assert ok.json() == {"outputs": [[2.0, 4.0, 6.0]]}
