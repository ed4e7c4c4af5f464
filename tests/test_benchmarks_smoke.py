"""The benchmark suite still runs: ``python -m benchmarks --quick`` on tiny inputs.

No figure is asserted (speed goals live in the benchmark's own report); this
only keeps the suite from rotting: every part must run and report no failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("tar")), reason="needs curl, tar")
def test_quick_benchmark_runs_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout
    report = (tmp_path / "quick.md").read_text()
    for part in (
        "Apply",
        "Batched",
        "Infer",
        "Resolve",
        "Prefetch",
        "Memory",
        "Gzip",
        "Far origin",
        "Startup",
    ):
        assert part.lower() in report.lower(), part
    assert (tmp_path / "quick.json").is_file()
