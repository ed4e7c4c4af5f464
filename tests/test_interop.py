"""Interop with the peer and with plain hosts.

tensorflow_hub loads a module from ``asynchub serve``'s app; asynchub loads one
from ``python -m http.server`` (a static host that ignores the query); and the
two libraries share one cache directory.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asynchub
from asynchub.server import create_app, serve_in_thread

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A Keras model, exported and packed into ROOT/interop/mlp/1.tar.gz."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh")])
    root = tmp_path_factory.mktemp("interop") / "root"
    exported = asynchub.export(model, root.parent / "export")
    asynchub.pack(exported, root / "interop" / "mlp" / "1.tar.gz")
    return model, root


X = np.linspace(-1, 1, 10, dtype="float32").reshape(2, 5)


def test_tensorflow_hub_loads_from_asynchub_serve(
    published: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow_hub as tfhub

    model, root = published
    tfhub_cache = tmp_path / "tfhub-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tfhub_cache))
    with serve_in_thread(create_app(root)) as base:
        url = f"{base}/interop/mlp/1"
        loaded = tfhub.load(url)
        y = loaded.signatures["serving_default"](**_kw(loaded, X))
    key = hashlib.sha1(url.encode()).hexdigest()
    assert (tfhub_cache / key / "saved_model.pb").is_file()
    (out,) = y.values()
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(X)), rtol=1e-6)

    # The same cache, read by asynchub: tensorflow_hub's entry is used as is.
    with asynchub.Hub(cache_dir=tfhub_cache, offline=True) as hub:
        assert hub.resolve(url) == tfhub_cache / key
        np.testing.assert_allclose(np.asarray(hub.load(url)(X)), np.asarray(model(X)), rtol=1e-6)


def _kw(loaded: Any, x: np.ndarray) -> dict[str, Any]:
    (name,) = loaded.signatures["serving_default"].structured_input_signature[1]
    return {name: x}


@pytest.fixture
def static_server(published: tuple[Any, Path]) -> Iterator[str]:
    """``python -m http.server`` over ROOT/interop/mlp, on 127.0.0.1."""
    _model, root = published
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root / "interop" / "mlp",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_asynchub_loads_from_a_static_server_that_ignores_the_query(
    published: tuple[Any, Path], static_server: str, cache_dir: Path
) -> None:
    model, _root = published
    url = f"{static_server}/1.tar.gz"
    m = asynchub.load(url)
    assert m.path.parent == cache_dir
    np.testing.assert_allclose(np.asarray(m(X)), np.asarray(model(X)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(m(X, signature="default")), np.asarray(model(X)), rtol=1e-6
    )
