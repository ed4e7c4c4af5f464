"""Handles the way the ecosystem writes them: kaggle:// and tfhub.dev's redirect chains.

``kaggle://OWNER/MODEL/FRAMEWORK/VARIATION/VERSION`` (keras_hub's form) is the
Kaggle Models URL tensorflow_hub fetches, and shares its cache entry (and so
its mirror copy and its lock-file line). tfhub.dev handles now answer with a
redirect chain that ends at a signed storage URL; a retry after a failure
there starts again from the handle, whose chain gives a fresh signature.
Nothing here reaches the internet: Kaggle is reached through a mirror, the
redirect chain is served on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import asynchub
from asynchub import AsyncHub, HandleError, Hub, Retries
from asynchub._handles import cache_key, kaggle_url, parse
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server

FAST = Retries(total=3, backoff=0.01, max_backoff=0.05)
KAGGLE = "kaggle://google/mobilenet-v2/TensorFlow2/100-224-classification/2"
KAGGLE_URL = (
    "https://www.kaggle.com/models/google/mobilenet-v2/TensorFlow2/100-224-classification/2"
)


def test_a_kaggle_handle_is_its_kaggle_models_url() -> None:
    parsed = parse(KAGGLE)
    assert kaggle_url(KAGGLE) == KAGGLE_URL
    assert parsed.name == KAGGLE_URL and parsed.text == KAGGLE
    assert parsed.url == KAGGLE_URL + "?tf-hub-format=compressed"
    assert parsed.key == parse(KAGGLE_URL).key == cache_key(KAGGLE_URL)
    assert parse(KAGGLE_URL).key == hashlib.sha1(KAGGLE_URL.encode()).hexdigest()  # tfhub's
    pinned = parse(f"{KAGGLE}#sha256={'a' * 64}")
    assert pinned.key == parsed.key and pinned.digest == "a" * 64
    assert parse("kaggle://keras/bert/keras/bert_base_en").name.endswith("/bert_base_en")


@pytest.mark.parametrize(
    "bad",
    [
        "kaggle://google/mobilenet-v2",
        "kaggle://google/mobilenet-v2/TensorFlow2/100-224-classification/two",
        "kaggle://google/mobilenet-v2/TensorFlow2/100-224-classification/2/3",
        "kaggle://google/../TensorFlow2/x/2",
        "kaggle://google//TensorFlow2/x/2",
        f"{KAGGLE}#size=3",
        "kaggle://",
    ],
)
def test_a_malformed_kaggle_handle_is_a_handle_error(bad: str) -> None:
    with pytest.raises(HandleError, match=r"kaggle|fragment"):
        parse(bad)


@pytest.fixture
def kaggle_mirror(tmp_path: Path) -> tuple[Path, Path]:
    """A local mirror holding the Kaggle module under its cache key, as 'mirror push' puts it."""
    module = make_module(tmp_path / "module")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{cache_key(KAGGLE_URL)}.tar.gz").write_bytes(tar_bytes(module))
    return mirror, module


@pytest.mark.anyio
async def test_kaggle_handle_and_url_share_one_entry(
    cache_dir: Path, kaggle_mirror: tuple[Path, Path]
) -> None:
    mirror, module = kaggle_mirror
    async with AsyncHub(cache_dir=cache_dir, mirrors=[str(mirror)], retries=FAST) as hub:
        path = await hub.resolve(KAGGLE)
    assert path == cache_dir / cache_key(KAGGLE_URL)
    assert tree(path) == tree(module)
    # The URL form finds it, offline: no second download, no second entry.
    async with AsyncHub(cache_dir=cache_dir, offline=True) as hub:
        assert await hub.resolve(KAGGLE_URL) == path
        assert await hub.resolve(KAGGLE) == path
    descriptor = (cache_dir / f"{cache_key(KAGGLE_URL)}.descriptor.txt").read_text()
    assert KAGGLE_URL in descriptor  # what tensorflow_hub would have written


def test_kaggle_handle_through_the_sync_hub(
    cache_dir: Path, kaggle_mirror: tuple[Path, Path]
) -> None:
    mirror, module = kaggle_mirror
    with Hub(cache_dir=cache_dir, mirrors=[str(mirror)], retries=FAST) as hub:
        assert tree(hub.resolve(KAGGLE)) == tree(module)


# -- tfhub.dev's chain: handle -> Kaggle -> signed storage URL --------------------------


def _chain(server: Server, body: bytes, **storage: object) -> str:
    server.add("/storage/blob", body=body, **storage)
    server.add("/models/o/m/f/v/1", redirect=server.url("/storage/blob?sig=1"))
    return server.add("/tfhub/o/m/1", redirect=server.url("/models/o/m/f/v/1"))


@pytest.mark.anyio
async def test_a_redirect_chain_to_signed_storage_resolves(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "m")
    handle = _chain(server, tar_bytes(module))
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as hub:
        path = await hub.resolve(handle)
    assert tree(path) == tree(module)
    assert path == cache_dir / cache_key(handle)  # the handle's entry, not the signed URL's


@pytest.mark.anyio
async def test_a_retry_after_a_failure_at_the_signed_url_starts_from_the_handle(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "m")
    handle = _chain(server, tar_bytes(module), fail_first=[403, 503])
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as hub:
        with pytest.raises(asynchub.HTTPStatusError):  # an expired signature: 403 is final
            await hub.resolve(handle)
        path = await hub.resolve(handle)  # 503, then a fresh chain
    assert tree(path) == tree(module)
    assert len(server.gets("/tfhub/o/m/1")) == 3  # every attempt from the handle
    assert len(server.gets("/storage/blob")) == 3


@pytest.mark.anyio
async def test_a_cut_at_the_signed_url_resumes_through_the_handle(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    module = make_module(tmp_path / "m", weights=400_000)
    body = tar_bytes(module)
    handle = _chain(server, body, cut_at=len(body) // 2)
    async with AsyncHub(cache_dir=cache_dir, retries=FAST) as hub:
        path = await hub.resolve(handle)
    assert tree(path) == tree(module)
    gets = server.gets("/storage/blob")
    assert len(server.gets("/tfhub/o/m/1")) == len(gets) >= 2
    assert any(g.get("Range", "").startswith("bytes=") for g in gets[1:])  # resumed, not restarted
