"""Processes the tests start: fresh interpreters (nothing imported yet) that report as
JSON, and ``asynchub serve ROOT --infer`` on a free port, stopped as Ctrl-C would stop
it, with a clean exit required."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Seconds a server may take to start (it imports TensorFlow; CI machines are slow).
START_TIMEOUT = 120


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh interpreter that imports this checkout, TensorFlow quiet."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def run_fresh(code: str, **env: str) -> object:
    """Run ``code`` in a fresh interpreter; its last line of output, read as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=fresh_env(**env),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class ServeProcess:
    """A running ``asynchub serve``: its process, ``host:port``, and its log so far."""

    proc: subprocess.Popen[str]
    address: str  # host:port, as tritonclient takes it
    log: list[str]
    reader: threading.Thread
    root: Path

    @property
    def base(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        stop_cleanly(self.proc, self.reader, self.log)


def start_serve(
    base: Path, root: Path, *options: str, build: Callable[[Path], object] | None = None
) -> ServeProcess:
    """``python -m asynchub serve root --infer OPTIONS`` on a free port of 127.0.0.1, its
    cache under ``base``. ``build(root)`` runs while the server imports TensorFlow
    (modules load on first use, so they may be written meanwhile)."""
    env = {
        **os.environ,
        "TFHUB_CACHE_DIR": str(base / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "asynchub", "serve", str(root), "--infer"]
    command += ["--host", "127.0.0.1", "--port", "0", "--no-access-log", *options]
    proc = subprocess.Popen(
        command, cwd=base, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if build is not None:
            build(root)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the server did not start in {START_TIMEOUT}s:\n{''.join(log)}")
            if line is None:
                pytest.fail(f"the server exited {proc.wait()}:\n{''.join(log)}")
            found = re.search(r"Uvicorn running on http://(\S+)", line)
            if found:
                return ServeProcess(proc, found.group(1), log, reader, root)
    except BaseException:
        proc.kill()
        proc.wait()
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()
        raise


def stop_cleanly(proc: subprocess.Popen[str], reader: threading.Thread, log: list[str]) -> None:
    """SIGINT ``proc``, wait for it (killing it after 30 s), and require exit status 0."""
    proc.send_signal(signal.SIGINT)
    try:
        status = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert status == 0, "".join(log)
