#!/usr/bin/env python3
"""The project's task runner: `python3 dev.py demo | test | bench | lint`.

Each task creates (or reuses) the virtual environment `.venv` beside this file,
installs the project with its extras when pyproject.toml changed since the
last install, and runs inside it. It needs nothing but Python 3.10+ and the
package registries, so the README's two commands work on a fresh machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ASYNCHUB_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
EXTRAS = "dev"


def _stamp() -> str:
    digest = hashlib.sha256()
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(EXTRAS.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_env() -> None:
    """Create the venv and install the project into it when out of date."""
    if not PY.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    stamp_file = VENV / ".asynchub-installed"
    stamp = _stamp()
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    print(f"dev.py: installing asynchub[{EXTRAS}] into {VENV}", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[{EXTRAS}]"], check=True)
    stamp_file.write_text(stamp)


def run(*cmd: str) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def tool(name: str) -> str:
    return str(BIN / name)


def lint() -> int:
    paths = ("asynchub", "tests", "benchmarks", "examples", "dev.py")
    return (
        run(tool("ruff"), "check", *paths)
        or run(tool("ruff"), "format", "--check", *paths)
        or run(tool("mypy"))
        # The architecture (pyproject.toml, [tool.importlinter]): layers, private modules,
        # no import circles.
        or run(tool("lint-imports"), "--no-cache")
    )


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task in {"help", "-h", "--help"}:
        print(__doc__)
        return 0
    ensure_env()
    if task == "demo":
        return run(str(PY), "-m", "asynchub.demo", *rest)
    if task == "lint":
        return lint()
    if task == "test":
        status = lint()
        if status:
            return status
        return run(str(PY), "-m", "pytest", *rest)
    if task == "bench":
        return run(str(PY), "-m", "benchmarks", *rest)
    if task == "fmt":
        return run(tool("ruff"), "format", ".") or run(tool("ruff"), "check", "--fix", ".")
    print(f"dev.py: unknown task {task!r}; try: demo, test, bench, lint, fmt", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
