"""asynchub's own processes start lean: the CLI and the worker processes (asynchub/_launch.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from asynchub import _workers
from tests._archives import make_module, tar_bytes
from tests._httpserver import Server
from tests.test_prefetch import key

REPO = Path(__file__).resolve().parents[1]


#: Runs ``python -m asynchub`` as the interpreter would, and at exit writes the
#: modules it really loaded (a refused import leaves None in sys.modules) to $LOADED.
_RUN_CLI = """
import atexit, os, runpy, sys
def report():
    with open(os.environ["LOADED"], "w") as out:
        out.write("\\n".join(n for n, m in sys.modules.items() if m is not None))
atexit.register(report)
sys.argv[0] = "asynchub"
runpy.run_module("asynchub", run_name="__main__", alter_sys=True)
"""


def test_the_cli_downloads_without_httpx_cli_or_trio(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    url = server.add("/m", body=tar_bytes(make_module(tmp_path / "m")))
    loaded = tmp_path / "loaded.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TFHUB_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, "prefetch", "-q", url],
        capture_output=True,
        text=True,
        env={**env, "LOADED": str(loaded)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\t")[0] == str(cache_dir / key(url))
    imported = set(loaded.read_text().split())
    assert {"httpx", "anyio", "asynchub._hub"} <= imported  # the check can see imports
    assert not imported & {"trio", "httpx._main", "pygments", "tensorflow"}


def test_a_worker_process_starts_without_the_package_s_other_parts() -> None:
    # The child's boot line, up to its entry point's import (main() would read stdin).
    # worker() imports what the child runs, then calls child.main, which prints them instead.
    listing = (
        "lambda make_hub: print('\\n'.join(n for n, m in sys.modules.items() if m is not None))"
    )
    boot = _workers.parent._BOOT.replace(
        "; worker()",
        f"; from asynchub._workers import child; child.main = {listing}; worker()",
    )
    done = subprocess.run(
        [sys.executable, "-c", boot, json.dumps(sys.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = set(done.stdout.split())
    assert "asynchub._workers.child" in imported and "asynchub._hub" in imported
    unused = {"trio", "httpx._main", "click", "rich", "asynchub._sync", "asynchub._module"}
    assert not imported & unused, imported & unused


def test_importing_asynchub_alone_imports_no_hub() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, asynchub; print('httpx' in sys.modules)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"
