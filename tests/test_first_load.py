"""A first load imports TensorFlow while it downloads.

``load(url)`` on an empty cache used to download, then import TensorFlow (seconds),
then load. The import now runs in a thread as soon as the hub knows it must
download. Each test runs a fresh interpreter (TensorFlow not yet imported) against
a real HTTP server whose body is held mid-way until the test lets it go.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import asynchub
from tests._httpserver import Server
from tests._procs import fresh_env

pytestmark = pytest.mark.tf

WATCH = """
import sys, threading, time
def watch():
    # Report once TensorFlow is imported whole (its import thread, if any, is gone).
    while True:
        busy = any(t.name == "asynchub-import-tensorflow" for t in threading.enumerate())
        if "tensorflow" in sys.modules and not busy:
            print("tensorflow imported", flush=True)
            return
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
"""


@pytest.fixture(scope="module")
def fruit(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests._savedmodels import fruit_module

    root = tmp_path_factory.mktemp("fruit")
    return asynchub.pack(fruit_module(root / "fruit"), root / "fruit.tar.gz").read_bytes()


@pytest.fixture
def child_env(cache_dir: Path) -> dict[str, str]:
    return fresh_env(TFHUB_CACHE_DIR=str(cache_dir))


def lines_until(proc: subprocess.Popen[str], wanted: str, timeout: float) -> list[str]:
    """The child's stdout lines up to and with ``wanted``; fails after ``timeout`` s."""
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == wanted:
                done.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"no {wanted!r} within {timeout}s; the child said {seen}"
    return seen


def test_tensorflow_is_imported_while_the_download_is_held(
    server: Server, fruit: bytes, child_env: dict[str, str], cache_dir: Path
) -> None:
    gate = threading.Event()
    url = server.add("/fruit/1", body=fruit, gate=gate)
    code = (
        WATCH
        + f"""
import numpy as np, asynchub
m = asynchub.load({url!r})
print("loaded", m(np.ones((1, 3), np.float32)).numpy().tolist(), flush=True)
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The body is held: TensorFlow must get imported meanwhile.
        lines_until(proc, "tensorflow imported", timeout=90)
        assert not list(cache_dir.glob("*/saved_model.pb"))  # still downloading
        gate.set()
        out, err = proc.communicate(timeout=120)
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "loaded [[2.0, 2.0, 2.0]]" in out
    assert len(server.gets("/fruit/1")) == 1


def test_a_failed_download_exits_without_waiting_for_the_import(
    server: Server, child_env: dict[str, str]
) -> None:
    url = server.add("/gone/1", status=404)
    code = f"""
import asynchub, asynchub._tf
try:
    asynchub.load({url!r})
except asynchub.HTTPStatusError as exc:
    # Exit while TensorFlow's import, started for the download, is under way.
    print("refused", exc.status, asynchub._tf._started, flush=True)
raise SystemExit(3)
"""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 3, out.stderr[-3000:]
    assert "refused 404 True" in out.stdout
    assert "Traceback" not in out.stderr  # nothing from the import thread at exit
    assert time.monotonic() - started < 60


def test_a_cached_module_is_loaded_without_the_import_thread(
    server: Server, fruit: bytes, child_env: dict[str, str]
) -> None:
    url = server.add("/fruit/2", body=fruit)
    asynchub.resolve(url)
    code = f"""
import asynchub, asynchub._tf
m = asynchub.load({url!r})
print(asynchub._tf._started, flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"
