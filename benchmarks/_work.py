"""What the benchmarks measure things on: models, archives, a static server, the machine.

Everything is made on the spot in one scratch directory per run (nothing is
downloaded: Keras applications get random weights), built at most once per run
and shared by the parts that need it, and deleted at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000


@dataclass
class Section:
    """One table of results: what was measured against what, the rows, the raw figures."""

    title: str
    note: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


class Work:
    """A scratch directory and the artifacts built in it, each built once per run."""

    def __init__(self, *, quick: bool) -> None:
        self.quick = quick
        self.root = Path(tempfile.mkdtemp(prefix="asynchub-bench-"))
        self._built: dict[str, Path] = {}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def fresh_dir(self, name: str) -> Path:
        """An empty directory ``name`` (emptied if it existed)."""
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _once(self, key: str, build: Callable[[Path], None]) -> Path:
        if key not in self._built:
            path = self.root / "built" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            build(path)
            log(f"built {key} in {time.perf_counter() - started:.1f}s")
            self._built[key] = path
        return self._built[key]

    def keras_module(self, name: str) -> Path:
        """A SavedModel of one of :data:`MODELS`, exported by ``asynchub`` (random weights)."""

        def build(path: Path) -> None:
            from asynchub._export import export

            export(MODELS[name](self.quick), path)

        return self._once(name, build)

    def keras_archive(self, name: str) -> Path:
        """:meth:`keras_module` packed by ``asynchub``'s ``pack`` (a reproducible tar.gz)."""

        def build(path: Path) -> None:
            from asynchub._pack import pack

            pack(self.keras_module(name), path)

        return self._once(f"{name}.tar.gz", build)

    def random_archive(self, size: int, *, seed: int = 0) -> Path:
        """A module-shaped tar.gz whose weights are ``size`` bytes of random float32."""
        return self._once(
            f"random-{size}-{seed}.tar.gz", lambda p: write_random_module(p, size, seed=seed)
        )

    def drop(self, path: Path) -> None:
        """Delete a built artifact now (big archives should not outlive their part)."""
        for key, built in list(self._built.items()):
            if built == path:
                del self._built[key]
        path.unlink(missing_ok=True)


def _mlp(quick: bool) -> Any:
    import keras

    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )


def _application(name: str, **options: Any) -> Callable[[bool], Any]:
    def build(quick: bool) -> Any:
        import keras

        factory = getattr(keras.applications, name)
        if quick:  # the same code paths, a fraction of the arithmetic and bytes
            return factory(weights=None, input_shape=(96, 96, 3), classes=10, **options)
        return factory(weights=None, **options)

    return build


MODELS: dict[str, Callable[[bool], Any]] = {
    "MLP": _mlp,
    "MobileNetV2": _application("MobileNetV2"),
    # TF Hub's mobilenet_v2_140_224: a ~23 MB archive, a typical module to prefetch.
    "MobileNetV2-1.4": _application("MobileNetV2", alpha=1.4),
    "ResNet101": _application("ResNet101"),
}


class _RandomWeights:
    """A readable stream of ``size`` bytes of random normal float32 (small, like weights)."""

    def __init__(self, size: int, seed: int) -> None:
        import numpy as np

        self._np = np
        self._rng = np.random.default_rng(seed)
        self._left = size

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        self._left -= n
        floats = self._rng.standard_normal((n + 3) // 4, dtype=self._np.float32)
        floats *= 0.05
        return floats.tobytes()[:n]


def write_random_module(path: Path, size: int, *, seed: int = 0) -> None:
    """Write a module-shaped tar.gz holding ``size`` bytes of float32 weights, streaming.

    Random normal float32 compresses about as badly as real trained weights do, so
    inflating it costs what inflating a real module costs. Compressed with ISA-L
    level 1 when available (quick to build), else zlib level 1.
    """
    try:
        from isal import igzip

        gz: Any = igzip.open(path, "wb", compresslevel=1)
    except ImportError:  # pragma: no cover - the dev extra installs isal
        import gzip

        gz = gzip.open(path, "wb", compresslevel=1)  # noqa: SIM115 - closed below
    members: list[tuple[str, bytes | None]] = [
        (".", None),
        ("saved_model.pb", b"\x08\x01" + bytes(62)),
        ("variables", None),
        ("variables/variables.index", b"index" * 20),
    ]
    with gz, tarfile.open(fileobj=gz, mode="w|", bufsize=4 * MB, copybufsize=4 * MB) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("variables/variables.data-00000-of-00001")
        info.size, info.mode = size, 0o644
        tar.addfile(info, _RandomWeights(size, seed))  # type: ignore[arg-type]


@contextlib.contextmanager
def static_server(root: Path) -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1 serving ``root``; yields its base URL.

    A plain static server that ignores the query string, as many hosts of hub
    archives do; it is a separate process, so its CPU shows up as load, not as
    the benchmark's own time.
    """
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 43211 (http://…/) ..."
        if "port" not in line:
            raise RuntimeError(f"http.server did not start: {line!r}")
        port = int(line.split("port", 1)[1].split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def run_checked(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; a non-zero exit is an error that names the command and its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)[:200]} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc


def tree_bytes(root: Path) -> int:
    """Total size of the files below ``root``; also checks the module landed."""
    if not (root / "saved_model.pb").is_file():
        raise RuntimeError(f"{root} holds no saved_model.pb: the extraction did not happen")
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("asynchub", "tensorflow", "keras", "tf-keras", "tensorflow-hub", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    for dist in ("isal", "zlib-ng"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:  # pragma: no cover
        memory = "unknown"
    root = Path(__file__).resolve().parent.parent
    commit = ""
    with contextlib.suppress(OSError):  # no git: not a checkout, or not installed
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or "unknown",
        "loadavg_start": loadavg(),
    }
