"""The worked example of docs/applying.md: train, save, load from a dir and over HTTP, predict.

scikit-learn's bundled digits (no download); the model is trained in memory,
saved as a SavedModel, packed and served on 127.0.0.1, then loaded back with
asynchub from the directory and from the URL. Accuracy must equal the
in-memory model's, to the sample.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

import asynchub as hub
from tests._httpserver import Server

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[object, Path, np.ndarray, np.ndarray]:
    import keras
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=15, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("digits") / "module"
    model.export(str(path), verbose=False)
    return model, path, x_test, y_test


def accuracy(logits: object, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == labels))


def test_digits_from_dir_and_url_match_the_model_in_memory(
    trained: tuple[object, Path, np.ndarray, np.ndarray],
    server: Server,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    model, path, x_test, y_test = trained
    expected = accuracy(model.predict(x_test, verbose=0), y_test)  # type: ignore[attr-defined]
    assert expected > 0.85  # the example trains a real classifier

    from_dir = hub.load(path)
    assert from_dir.path == path
    assert accuracy(from_dir(x_test), y_test) == expected

    archive = tmp_path / "digits.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(path, arcname=".")
    url = server.add("/digits/1", body=archive.read_bytes())
    from_url = hub.load(url)
    assert from_url.handle == url
    assert from_url.path.parent == cache_dir
    assert accuracy(from_url(x_test), y_test) == expected
    assert accuracy(from_url(x_test, signature="serving_default"), y_test) == expected


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_aload_loads_in_a_worker_thread(
    trained: tuple[object, Path, np.ndarray, np.ndarray], cache_dir: Path
) -> None:
    _model, path, x_test, _ = trained
    async with hub.AsyncHub() as h:
        module = await h.load(path)
    assert np.asarray(module(x_test[:3])).shape == (3, 10)


def test_load_of_a_dir_without_saved_model_names_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(hub.ModuleError, match=r"notes\.txt"):
        hub.load(tmp_path)
