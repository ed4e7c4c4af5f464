"""TensorFlow's import and a SavedModel's load run with the cyclic collector paused.

Both are bursts of long-lived objects; with Ray or TensorFlow loaded, each full
collection meanwhile scans the whole heap (0.1-0.2 s each, five of them for an
import and a MobileNetV2 load). ``asynchub._tf.gc_paused`` pauses the collector
and puts it back as it was, however the pauses nest or overlap.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynchub._tf import gc_paused
from tests._procs import run_fresh


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


def test_a_pause_ends_as_the_collector_was(collector_on: None) -> None:
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the caller's choice stays
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError), gc_paused():
        1 / 0  # noqa: B018
    assert gc.isenabled()


def test_nested_and_overlapping_pauses_end_together(collector_on: None) -> None:
    with gc_paused():
        with gc_paused():
            pass
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()

    entered, release = threading.Barrier(3), threading.Event()
    seen: list[bool] = []

    def pause() -> None:
        with gc_paused():
            entered.wait(5)
            release.wait(5)
            seen.append(gc.isenabled())

    threads = [threading.Thread(target=pause) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait(5)
    assert not gc.isenabled()
    release.set()
    for t in threads:
        t.join(5)
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_big_burst_gets_one_full_collection_when_the_pause_ends(collector_on: None) -> None:
    full: list[bool] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(gc.isenabled())

    kept: list[object] = []
    gc.callbacks.append(count)
    try:
        with gc_paused():
            kept += [[i] for i in range(20_000)]  # a small burst: left to the collector
        assert full == []
        with gc_paused():
            kept += [[i] for i in range(150_000)]  # an import's worth: one full pass now
        assert full == [True]
        # Objects made in one pause that ends inside another are the outer one's.
        with gc_paused():
            with gc_paused():
                kept += [[i] for i in range(150_000)]
            assert full == [True]
        assert full == [True, True]
    finally:
        gc.callbacks.remove(count)
    assert len(kept) == 320_000


@pytest.mark.tf
def test_loading_a_module_runs_no_collection(
    tmp_path: Path, collector_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    from asynchub._module import load_module
    from tests._savedmodels import fruit_module

    path = fruit_module(tmp_path / "fruit")
    load_module(path, handle="fruit")  # TensorFlow's own first-load work, once
    inside = threading.Event()
    during: list[int] = []
    load = tf.saved_model.load

    def spy(*args: object, **kwargs: object) -> object:
        inside.set()
        try:
            return load(*args, **kwargs)
        finally:
            inside.clear()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and inside.is_set():
            during.append(info["generation"])

    monkeypatch.setattr(tf.saved_model, "load", spy)
    gc.callbacks.append(count)
    try:
        for _ in range(3):
            load_module(path, handle="fruit")
    finally:
        gc.callbacks.remove(count)
    # The collections the loads' objects call for run after each load, not during it.
    assert during == []
    assert gc.isenabled()


@pytest.mark.tf
def test_importing_tensorflow_runs_one_full_collection_at_its_end() -> None:
    code = """
import gc, json
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                    and full.append(1))
from asynchub._tf import import_tensorflow
import_tensorflow()
print(json.dumps([len(full), gc.isenabled(), "tensorflow" in __import__("sys").modules]))
"""
    # Unpaused, the import ran six full collections as the heap grew.
    assert run_fresh(code) == [1, True, True]
