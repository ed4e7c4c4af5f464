"""An ``s3://``/``gs://`` prefix is copied from one listing snapshot, or not at all.

Against the real servers (moto, fake-gcs-server) on 127.0.0.1. The store is
changed *between the listing and a read* by a proxy that sees each request on
the wire (``HookProxy``): it uploads a new version of an object just before
that object's GET reaches the server, so the race is real and always won the
same way. moto answers ``If-Match`` with 412; fake-gcs-server ignores it, so
there the answer's ETag and size are what catch the change. Either way the
download restarts from a fresh listing a bounded number of times, or fails
with an error naming the object, and leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import asynchub
from asynchub import AsyncHub, HTTPStatusError, Hub, NetworkError, ProgressKind
from asynchub._handles import cache_key
from asynchub._sources import Transfer, objstore
from tests._archives import make_module, tree
from tests._objstores import GcsServer, HookProxy, S3Server

REPO = Path(__file__).resolve().parents[1]
FAST = asynchub.Retries(total=2, backoff=0.01, max_backoff=0.05)
DATA = "variables/variables.data-00000-of-00001"


def entries(cache_dir: Path) -> list[str]:
    """Everything in the cache dir: module dirs, records, descriptors, tmp dirs, locks."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "module-src")


class Store:
    """One bucket on one of the two servers, reached through a HookProxy."""

    def __init__(self, kind: str, s3: S3Server | None, gcs: GcsServer | None) -> None:
        self.kind = kind
        self._s3, self._gcs = s3, gcs
        self.bucket = s3.bucket() if s3 is not None else gcs.bucket()  # type: ignore[union-attr]
        self.hook: Callable[[str], int | None] = lambda line: None
        if s3 is not None:
            port = int(s3.endpoint.rsplit(":", 1)[1])
            self.proxy = HookProxy(port, lambda line: self.hook(line))
        else:
            assert gcs is not None
            host = gcs.base.removeprefix("http://")
            self.proxy = HookProxy(int(host.rsplit(":", 1)[1]), lambda line: self.hook(line), host)

    def put(self, key: str, body: bytes) -> str:
        if self._s3 is not None:
            return self._s3.put(self.bucket, key, body)
        assert self._gcs is not None
        return self._gcs.put(self.bucket, key, body)

    def put_tree(self, prefix: str, root: Path) -> str:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.put(prefix + path.relative_to(root).as_posix(), path.read_bytes())
        return f"{'s3' if self.kind == 's3' else 'gs'}://{self.bucket}/{prefix}"

    def options(self) -> dict[str, Any]:
        """The hub's keywords that send its requests through the proxy."""
        if self.kind == "s3":
            return {"s3_options": {"endpoint": self.proxy.url}}
        return {"gcs_options": {"base_url": self.proxy.url}}

    def env(self) -> dict[str, str]:
        """The same for a command in a child process: the standard environment."""
        if self._s3 is not None:
            return {**self._s3.env(), "AWS_ENDPOINT_URL": self.proxy.url}
        assert self._gcs is not None
        return {**self._gcs.env(), "GOOGLE_BASE_URL": self.proxy.url}

    def on_get(self, key: str, action: Callable[[], None], *, times: int = 1) -> list[int]:
        """Run ``action`` just before the first ``times`` GETs of ``key`` reach the server."""
        seen = [0]
        path = f"/{self.bucket}/{key}"

        def hook(line: str) -> None:
            method, target = line.split(" ")[:2]
            if method == "GET" and target == path:
                seen[0] += 1
                if seen[0] <= times:
                    action()

        self.hook = hook
        return seen


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "s3":
        made = Store("s3", request.getfixturevalue("s3"), None)
    else:
        made = Store("gs", None, request.getfixturevalue("gcs"))
    try:
        yield made
    finally:
        made.proxy.close()


def hub(cache_dir: Path, store: Store, **kwargs: Any) -> AsyncHub:
    kwargs.setdefault("retries", FAST)
    return AsyncHub(cache_dir=cache_dir, **store.options(), **kwargs)


def flipped(data: bytes) -> bytes:
    """Another version of the same size."""
    return bytes(b ^ 0xFF for b in data)


# -- an object replaced after the listing -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["same size", "other size"])
async def test_object_replaced_after_listing_fails_naming_it(
    store: Store, cache_dir: Path, module: Path, size: str
) -> None:
    """No retries left: a clear error naming the object, and nothing in the cache."""
    handle = store.put_tree("m/", module)
    v1 = (module / DATA).read_bytes()
    v2 = flipped(v1) if size == "same size" else v1 + b"more"
    store.on_get(f"m/{DATA}", lambda: store.put(f"m/{DATA}", v2))
    async with hub(cache_dir, store, retries=0) as h:
        with pytest.raises(HTTPStatusError) as info:
            await h.resolve(handle)
    error = info.value
    assert error.handle == handle and error.status == 412
    assert handle in str(error) and DATA in str(error)
    assert "changed after the prefix was listed" in str(error)
    assert entries(cache_dir) == []


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["same size", "other size"])
async def test_object_replaced_after_listing_restarts_from_a_fresh_listing(
    store: Store, cache_dir: Path, module: Path, size: str
) -> None:
    """With a retry left, the copy starts over and holds one version of everything."""
    handle = store.put_tree("m/", module)
    v1 = (module / DATA).read_bytes()
    v2 = flipped(v1) if size == "same size" else v1 + b"more"
    seen = store.on_get(f"m/{DATA}", lambda: store.put(f"m/{DATA}", v2))
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, store, progress=events.append) as h:
        path = await h.resolve(handle)
        assert await h.resolve(handle) == path  # the record fits what is on disk
    assert seen[0] == 2
    assert tree(path) == {**tree(module), DATA: v2}
    retried = [e for e in events if e.kind is ProgressKind.RETRYING]
    assert [e.attempt for e in retried] == [1] and DATA in str(retried[0].error)
    assert entries(cache_dir) == sorted(
        [
            cache_key(handle),
            f"{cache_key(handle)}.descriptor.txt",
            f"{cache_key(handle)}.manifest.json",
        ]
    )


def test_sync_hub_refuses_a_prefix_that_keeps_changing(
    store: Store, cache_dir: Path, module: Path
) -> None:
    """Every attempt sees another version: the last error names the object; nothing is left."""
    handle = store.put_tree("m/", module)
    v1 = (module / DATA).read_bytes()
    versions = iter(range(1, 1000))
    seen = store.on_get(
        f"m/{DATA}",
        lambda: store.put(f"m/{DATA}", bytes([next(versions) % 256]) * len(v1)),
        times=1000,
    )
    with Hub(cache_dir=cache_dir, retries=FAST, **store.options()) as h:  # noqa: SIM117
        with pytest.raises(HTTPStatusError, match="changed after the prefix was listed") as info:
            h.resolve(handle)
    assert seen[0] == FAST.total + 1  # one GET per attempt: bounded
    assert DATA in str(info.value) and info.value.handle == handle
    assert entries(cache_dir) == []


def test_cli_names_the_object_that_changed(store: Store, cache_dir: Path, module: Path) -> None:
    handle = store.put_tree("m/", module)
    v1 = (module / DATA).read_bytes()
    versions = iter(range(1, 1000))
    store.on_get(
        f"m/{DATA}",
        lambda: store.put(f"m/{DATA}", bytes([next(versions) % 256]) * len(v1)),
        times=1000,
    )
    env = {**_env_without_cloud(), **store.env(), "PYTHONPATH": str(REPO)}
    env["TFHUB_CACHE_DIR"] = str(cache_dir)
    entry = "from asynchub.cli import main; main(prog_name='asynchub')"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", entry, "resolve", "-q", handle],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {handle}: ") and DATA in last and "changed" in last
    assert entries(cache_dir) == []


def _env_without_cloud() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_", "TFHUB_")) and k != "STORAGE_EMULATOR_HOST"
    }


# -- folder markers -------------------------------------------------------------------


@pytest.mark.anyio
async def test_folder_markers_are_directories(store: Store, cache_dir: Path, module: Path) -> None:
    """``m/``, ``m/variables/``, a childless ``m/extra/``: what consoles' "create folder" writes."""
    for marker in ("m/", "m/variables/", "m/assets/", "m/extra/", "m/extra/deeper/"):
        store.put(marker, b"")
    handle = store.put_tree("m/", module)
    store.put("m/empty.txt", b"")  # an empty file is still a file
    async with hub(cache_dir, store) as h:
        path = await h.resolve(handle)
        assert await h.resolve(handle) == path
    assert tree(path) == {**tree(module), "empty.txt": b""}
    assert (path / "extra" / "deeper").is_dir() and not any((path / "extra" / "deeper").iterdir())
    assert not (path / "m").exists()


def test_sync_hub_with_folder_markers(store: Store, cache_dir: Path, module: Path) -> None:
    store.put("m/", b"")
    store.put("m/variables/", b"")
    handle = store.put_tree("m/", module)
    with Hub(cache_dir=cache_dir, **store.options()) as h:
        assert tree(h.resolve(handle)) == tree(module)


def test_listing_snapshot_recognises_markers() -> None:
    """Pure: what a flat listing holds, split into files, directories and undecided names."""
    etag = '"d41d8cd98f00b204e9800998ecf8427e"'

    def meta(path: str, size: int, e_tag: str | None = etag) -> dict[str, Any]:
        return {"path": path, "size": size, "e_tag": e_tag}

    listing = [
        meta("m", 0),  # the prefix's own marker "m/"
        meta("m/saved_model.pb", 5, '"abc"'),
        meta("m/variables", 0),  # "m/variables/", which has objects below it
        meta("m/variables/variables.index", 3, 'W/"def"'),
        meta("m/assets", 0),  # childless: a marker or an empty file, the store must say
        meta("m/nested/a/b", 1, None),  # a store that gave no ETag
    ]
    files, dirs, undecided = objstore.split_listing("m/", listing)
    assert {rel: (o.key, o.size, o.etag) for rel, o in files.items()} == {
        "saved_model.pb": ("m/saved_model.pb", 5, "abc"),
        "variables/variables.index": ("m/variables/variables.index", 3, "def"),
        "nested/a/b": ("m/nested/a/b", 1, None),
    }
    assert dirs == {"variables"}
    assert [(rel, o.key) for rel, o in undecided.items()] == [("assets", "m/assets")]
    assert objstore.same_etag("abc", '"abc"') and objstore.same_etag(None, '"abc"')
    assert not objstore.same_etag("abc", '"abd"')


# -- one stall budget per prefix --------------------------------------------------------


def test_stalls_at_the_same_time_count_once() -> None:
    """Pure: the budget is time spent stalled, however many objects stalled in it."""
    t = Transfer()
    assert t.stall(0.3, now=10.0) == pytest.approx(0.3)
    assert t.stall(0.3, now=10.1) == pytest.approx(0.4)  # overlapped all but 0.1 s
    assert t.stall(0.3, now=10.1) == pytest.approx(0.4)  # wholly inside the last one
    assert t.stall(0.3, now=11.0) == pytest.approx(0.7)  # after a gap: all of it
    t.restart()
    assert t.stalled == pytest.approx(0.7)  # a fresh attempt keeps the budget


STALLY = asynchub.Timeouts(connect=5.0, read=0.3, stalled=1.0)


@pytest.mark.anyio
@pytest.mark.parametrize("what", ["objects", "listing"])
async def test_a_stalling_prefix_gives_up_on_one_budget(
    store: Store, cache_dir: Path, module: Path, what: str
) -> None:
    """Every GET of the objects (or the listing) stalls: one budget for all, over attempts."""
    handle = store.put_tree("m/", module)
    prefix = f"/{store.bucket}/m/"

    def hook(line: str) -> int | None:
        target = line.split(" ")[1]
        hit = target.startswith(prefix) if what == "objects" else "?" in target
        return 0 if hit else None  # held back from its first byte

    store.hook = hook
    retries = asynchub.Retries(total=8, backoff=0.01, max_backoff=0.02)
    events: list[asynchub.ProgressEvent] = []
    started = time.monotonic()
    with anyio.fail_after(10):
        async with hub(
            cache_dir, store, retries=retries, timeout=STALLY, progress=events.append
        ) as h:
            with pytest.raises(NetworkError, match=r"stalled for [\d.]+s in all") as info:
                await h.resolve(handle)
    assert time.monotonic() - started < 5
    assert info.value.handle == handle
    attempts = [e.attempt for e in events if e.kind is ProgressKind.RETRYING and e.attempt]
    assert len(attempts) < retries.total  # the budget ended it, not the retries
    assert entries(cache_dir) == []


@pytest.mark.anyio
async def test_objects_stalling_together_are_one_stall(
    store: Store, cache_dir: Path, module: Path
) -> None:
    """Four objects stall mid-body at the same time, once each: survived, as one stall would be.

    Summed per object the stalls (4 x 0.5 s) would pass the 1.6 s budget.
    """
    for i in range(4):
        (module / "variables" / f"shard-{i}").write_bytes(bytes([i]) * 1_500_000)
    handle = store.put_tree("m/", module)
    big = f"/{store.bucket}/m/variables/shard-"
    stalled: set[str] = set()
    lock = threading.Lock()

    def hook(line: str) -> int | None:
        method, target = line.split(" ")[:2]
        with lock:
            if method == "GET" and target.startswith(big) and target not in stalled:
                stalled.add(target)
                return 1_200_000  # the headers and a first piece (1 MiB), then nothing
        return None

    store.hook = hook
    timeouts = asynchub.Timeouts(connect=5.0, read=0.5, stalled=1.6)
    events: list[asynchub.ProgressEvent] = []
    async with hub(cache_dir, store, timeout=timeouts, progress=events.append) as h:
        path = await h.resolve(handle)
    assert tree(path) == tree(module)
    assert len(stalled) == 4
    resumed = [e for e in events if e.kind is ProgressKind.RETRYING]
    assert len(resumed) == 4 and all(e.attempt == 0 for e in resumed)  # resumed, not restarted
