"""The module host: asynchub.server.create_app under a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import hashlib
import html
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from asynchub._pack import pack
from asynchub.errors import ModuleError
from asynchub.server import (
    ModuleSource,
    create_app,
    etag_matches,
    locate,
    requested_formats,
    scan,
    serve_in_thread,
    split_module_path,
)

uvicorn = pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]

X = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")


# -- pure logic, no server ------------------------------------------------------------------


def test_split_module_path() -> None:
    assert split_module_path("mnist/1") == ("mnist", "1")
    assert split_module_path("google/mnist/1") == ("google/mnist", "1")
    for bad in ["mnist", "", "a/../b", "../etc/1", "a/./1", "/etc/1", "a//1", "a/1/", "a/.git"]:
        assert split_module_path(bad) is None, bad
    assert split_module_path("a\\..\\b/1") is None
    assert split_module_path("a\x00/1") is None


def test_requested_formats_and_etags() -> None:
    assert requested_formats(["uncompressed, compressed"]) == ["uncompressed", "compressed"]
    assert requested_formats(["", "COMPRESSED"]) == ["compressed"]
    assert etag_matches('"a", W/"b"', '"b"')
    assert etag_matches("*", '"b"')
    assert not etag_matches('"a"', '"b"')
    assert not etag_matches(None, '"b"')


def fake_module(path: Path, payload: bytes = b"graph") -> Path:
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(payload)
    return path


def test_locate_and_scan(tmp_path: Path) -> None:
    fake_module(tmp_path / "google" / "tiny" / "1")
    fake_module(tmp_path / "solo" / "10")
    fake_module(tmp_path / "solo" / "2")
    fake_module(tmp_path / "both" / "1")
    pack(tmp_path / "solo" / "2", tmp_path / "both" / "1.tar.gz")
    (tmp_path / "packed").mkdir()
    pack(tmp_path / "solo" / "2", tmp_path / "packed" / "3.tar.gz")
    fake_module(tmp_path / "toplevel")  # NAME/VERSION needs two segments: not a module
    (tmp_path / "outside").mkdir()
    fake_module(tmp_path / "outside" / "m")
    root = (tmp_path / "root").resolve()
    root.mkdir()

    found = scan(tmp_path.resolve())
    assert [(s.id, s.prebuilt) for s in found] == [
        ("both/1", True),
        ("google/tiny/1", False),
        ("outside/m", False),
        ("packed/3", True),
        ("solo/2", False),
        ("solo/10", False),
    ]
    both = locate(tmp_path.resolve(), "both", "1")
    assert both == ModuleSource("both", "1", tmp_path.resolve() / "both" / "1.tar.gz", True)
    assert locate(tmp_path.resolve(), "solo", "3") is None
    # Nothing inside a module is a module of its own, even a file named like one.
    pack(tmp_path / "solo" / "2", tmp_path / "solo" / "10" / "variables" / "inner.tar.gz")
    assert locate(tmp_path.resolve(), "solo/10/variables", "inner") is None

    # Links are followed only while they stay inside ROOT.
    (root / "escape").mkdir()
    (root / "escape" / "1").symlink_to(tmp_path / "outside" / "m")
    (root / "inner").mkdir()
    fake_module(root / "real" / "1")
    (root / "inner" / "1").symlink_to(root / "real" / "1")
    assert locate(root, "escape", "1") is None
    assert locate(root, "inner", "1") is not None
    assert [s.id for s in scan(root)] == ["inner/1", "real/1"]
    (root / "real" / "loop").symlink_to(root)  # a link loop ends the walk, not the server
    assert [s.id for s in scan(root)] == ["inner/1", "real/1"]


# -- a real server ---------------------------------------------------------------------------


def make_keras_model() -> Any:
    keras = pytest.importorskip("keras")
    inputs = keras.Input(shape=(4,), name="features")
    x = keras.layers.Dense(6, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01))(
        inputs
    )
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


@dataclass
class Hosted:
    base: str
    root: Path
    cache: Path
    model: Any  # the in-memory Keras model behind "demo/1"
    packed: bytes  # pack() of ROOT/demo/1
    prebuilt: bytes  # the bytes of ROOT/demo/2.tar.gz, which wins over ROOT/demo/2/


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    tf = pytest.importorskip("tensorflow")
    from asynchub._export import export

    tmp = tmp_path_factory.mktemp("hosting")
    root = tmp / "root"
    model = make_keras_model()
    export(model, root / "demo" / "1")
    shutil.copytree(root / "demo" / "1", root / "google" / "demo" / "1")

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def __call__(self, x: Any) -> Any:
            return 2.0 * x

    # demo/2 exists twice: the directory (a copy of demo/1) and a prebuilt archive of
    # another module; the archive must win.
    shutil.copytree(root / "demo" / "1", root / "demo" / "2")
    prebuilt = pack(export(Doubler(), tmp / "doubler"), root / "demo" / "2.tar.gz").read_bytes()
    packed = pack(root / "demo" / "1", tmp / "demo-1.tar.gz").read_bytes()
    # Something outside ROOT that no URL may reach.
    pack(root / "demo" / "1", tmp / "secret.tar.gz")

    cache = tmp / "cache"
    with serve_in_thread(create_app(root, cache_dir=cache)) as base:
        yield Hosted(base, root, cache, model, packed, prebuilt)


@pytest.fixture(scope="module")
def client(hosted: Hosted) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hosted.base, timeout=30) as c:
        yield c


COMPRESSED = {"tf-hub-format": "compressed"}


# Round-trip helpers: download, extract, load. Once the resolver lands, `load_module`
# becomes `hub.load(url)` and the other two go away.


def download(url: str) -> bytes:
    with httpx.Client(timeout=30) as c:
        response = c.get(url, params=COMPRESSED)
        response.raise_for_status()
        return response.content


def extract(archive: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Pythons without extraction filters
            tar.extractall(dest)
    return dest


def load_module(url: str, tmp_path: Path) -> Any:
    tf = pytest.importorskip("tensorflow")
    return tf.saved_model.load(str(extract(download(url), tmp_path / "module")))


def raw_get(base: str, target: str) -> int:
    """GET ``target`` byte for byte (httpx would normalize ``..`` away); return the status."""
    host, port = httpx.URL(base).host, httpx.URL(base).port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.tf
def test_round_trip_matches_the_in_memory_model(hosted: Hosted, tmp_path: Path) -> None:
    loaded = load_module(f"{hosted.base}/demo/1", tmp_path)
    expected = hosted.model(X, training=False).numpy()
    np.testing.assert_allclose(loaded(X, training=False).numpy(), expected, rtol=1e-6)
    out = loaded.signatures["default"](features=X)["default"]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


@pytest.mark.tf
def test_round_trip_through_the_resolver(hosted: Hosted, tmp_path: Path) -> None:
    import asynchub

    with asynchub.Hub(cache_dir=tmp_path / "cache") as hub:
        for name in ("demo/1", "google/demo/1"):
            m = hub.load(f"{hosted.base}/{name}")
            expected = hosted.model(X, training=False).numpy()
            np.testing.assert_allclose(np.asarray(m(X)), expected, rtol=1e-6)
            out = m(X, signature="serving_default", as_dict=True)
            np.testing.assert_allclose(np.asarray(out["default"]), expected, rtol=1e-6)
        doubled = hub.load(f"{hosted.base}/demo/2")  # the prebuilt archive
        assert np.asarray(doubled(np.array([2.0], "float32"))).tolist() == [4.0]


@pytest.mark.tf
def test_archive_is_the_packed_directory(hosted: Hosted, client: httpx.Client) -> None:
    response = client.get("/demo/1", params=COMPRESSED)
    assert response.status_code == 200
    assert response.content == hosted.packed
    assert response.headers["content-type"] == "application/gzip"
    assert "content-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(hosted.packed))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    assert etag == f'"{hashlib.sha256(hosted.packed).hexdigest()[:40]}"'  # strong, by content
    # The same URL again: the same ETag, from the same cached archive.
    assert client.get("/demo/1", params=COMPRESSED).headers["etag"] == etag
    assert len([p for p in hosted.cache.iterdir() if p.name.endswith(".tar.gz")]) >= 1


@pytest.mark.tf
def test_nested_names(hosted: Hosted, client: httpx.Client) -> None:
    response = client.get("/google/demo/1", params=COMPRESSED)
    assert response.status_code == 200
    assert response.content == hosted.packed


@pytest.mark.tf
def test_accepts_a_list_of_formats(hosted: Hosted, client: httpx.Client) -> None:
    response = client.get("/demo/1", params={"tf-hub-format": "uncompressed,compressed"})
    assert response.status_code == 200
    assert response.content == hosted.packed


@pytest.mark.tf
def test_head(hosted: Hosted, client: httpx.Client) -> None:
    get = client.get("/demo/1", params=COMPRESSED)
    head = client.head("/demo/1", params=COMPRESSED)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(hosted.packed))
    assert head.headers["etag"] == get.headers["etag"]


@pytest.mark.tf
def test_if_none_match(hosted: Hosted, client: httpx.Client) -> None:
    etag = client.head("/demo/1", params=COMPRESSED).headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = client.get("/demo/1", params=COMPRESSED, headers={"If-None-Match": value})
        assert response.status_code == 304, value
        assert response.content == b""
        assert response.headers["etag"] == etag
    response = client.get("/demo/1", params=COMPRESSED, headers={"If-None-Match": '"other"'})
    assert response.status_code == 200
    assert response.content == hosted.packed


@pytest.mark.tf
def test_range(hosted: Hosted, client: httpx.Client) -> None:
    size = len(hosted.packed)
    response = client.get("/demo/1", params=COMPRESSED, headers={"Range": "bytes=10-109"})
    assert response.status_code == 206
    assert response.content == hosted.packed[10:110]
    assert response.headers["content-range"] == f"bytes 10-109/{size}"
    assert response.headers["content-length"] == "100"
    tail = client.get("/demo/1", params=COMPRESSED, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206
    assert tail.content == hosted.packed[-50:]


@pytest.mark.tf
def test_if_range(hosted: Hosted, client: httpx.Client) -> None:
    etag = client.head("/demo/1", params=COMPRESSED).headers["etag"]
    same = client.get(
        "/demo/1", params=COMPRESSED, headers={"Range": "bytes=5-9", "If-Range": etag}
    )
    assert same.status_code == 206
    assert same.content == hosted.packed[5:10]
    changed = client.get(
        "/demo/1", params=COMPRESSED, headers={"Range": "bytes=5-9", "If-Range": '"stale"'}
    )
    assert changed.status_code == 200
    assert changed.content == hosted.packed


@pytest.mark.tf
def test_unsatisfiable_range(hosted: Hosted, client: httpx.Client) -> None:
    size = len(hosted.packed)
    response = client.get("/demo/1", params=COMPRESSED, headers={"Range": f"bytes={size}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"


@pytest.mark.tf
def test_prebuilt_archive_is_served_as_is_and_wins(
    hosted: Hosted, client: httpx.Client, tmp_path: Path
) -> None:
    response = client.get("/demo/2", params=COMPRESSED)
    assert response.status_code == 200
    assert response.content == hosted.prebuilt
    assert response.headers["etag"] == f'"{hashlib.sha256(hosted.prebuilt).hexdigest()[:40]}"'
    loaded = load_module(f"{hosted.base}/demo/2", tmp_path)
    assert loaded(np.array([1.5], "float32")).numpy().tolist() == [3.0]
    page = html.unescape(client.get("/demo/2").text)
    assert "Prebuilt archive" in page
    assert "serving_default" in page


@pytest.mark.tf
def test_module_page(hosted: Hosted, client: httpx.Client) -> None:
    response = client.get("/demo/1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = html.unescape(response.text)
    for expected in ("demo", "version 1", "serving_default", "features", "float32", "(None, 4)"):
        assert expected in page, expected
    assert "<h3><code>default</code></h3>" in page
    assert f'import asynchub as hub\n\nm = hub.load("{hosted.base}/demo/1")' in page
    assert "saved_model.pb could not be read" not in page


@pytest.mark.tf
def test_index(hosted: Hosted, client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    page = response.text
    for href in ("/demo/1", "/demo/2", "/google/demo/1"):
        assert f"href='{href}'" in page, href
    assert "secret" not in page


@pytest.mark.tf
def test_unknown_module_is_404(hosted: Hosted, client: httpx.Client) -> None:
    for path in (
        "/nope/1",
        "/demo/9",
        "/demo",
        "/demo/1/variables",
        "/demo/2.tar.gz",
        "/" + "x" * 300 + "/1",  # longer than a file name may be
    ):
        assert client.get(path).status_code == 404, path
        assert client.get(path, params=COMPRESSED).status_code == 404, path


@pytest.mark.tf
def test_unknown_format_is_400(hosted: Hosted, client: httpx.Client) -> None:
    for value in ("zip", "uncompressed", ""):
        response = client.get("/demo/1", params={"tf-hub-format": value})
        assert response.status_code == 400, value
        assert "compressed" in response.text


@pytest.mark.tf
def test_paths_that_leave_root_are_404(hosted: Hosted) -> None:
    for target in (
        "/../secret?tf-hub-format=compressed",
        "/demo/../../secret?tf-hub-format=compressed",
        "/demo/%2e%2e/%2e%2e/secret?tf-hub-format=compressed",
        "/%2e%2e/secret",
        "/demo/..%2f..%2fsecret?tf-hub-format=compressed",
        "//etc/passwd",
        "/demo/1%00?tf-hub-format=compressed",
        "/demo/.%2e/1?tf-hub-format=compressed",
    ):
        assert raw_get(hosted.base, target) == 404, target


# -- directories packed on demand (no TensorFlow needed) -------------------------------------


def test_directory_changes_give_a_new_archive(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    module = fake_module(root / "live" / "1")
    with serve_in_thread(create_app(root, cache_dir=cache)) as base, httpx.Client() as c:
        first = c.get(f"{base}/live/1", params=COMPRESSED)
        cached = list(cache.iterdir())
        assert len(cached) == 1
        mtime = cached[0].stat().st_mtime_ns
        again = c.get(f"{base}/live/1", params=COMPRESSED)
        assert again.headers["etag"] == first.headers["etag"]
        assert cached[0].stat().st_mtime_ns == mtime  # not packed again
        (module / "variables" / "variables.index").write_bytes(b"new")
        changed = c.get(f"{base}/live/1", params=COMPRESSED)
        assert changed.status_code == 200
        assert changed.headers["etag"] != first.headers["etag"]
        assert changed.content == pack(module, tmp_path / "expected.tar.gz").read_bytes()
        assert len(list(cache.iterdir())) == 1  # the superseded archive is gone


def test_concurrent_requests_pack_once(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    module = fake_module(root / "busy" / "1")
    (module / "variables" / "variables.data-00000-of-00001").write_bytes(bytes(2_000_000))
    with serve_in_thread(create_app(root, cache_dir=cache)) as base:

        def fetch(_: int) -> bytes:
            return download(f"{base}/busy/1")

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(fetch, range(8)))
    assert len(set(bodies)) == 1
    assert [p.name.endswith(".tar.gz") for p in cache.iterdir()] == [True]


def test_unpackable_directory_is_500_and_its_page_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    module = fake_module(root / "broken" / "1")
    (module / "variables" / "link").symlink_to(module / "saved_model.pb")
    app = create_app(root, cache_dir=tmp_path / "cache")
    with serve_in_thread(app) as base, httpx.Client(base_url=base) as c:
        response = c.get("/broken/1", params=COMPRESSED)
        assert response.status_code == 500
        assert "broken/1" in response.text
        assert str(tmp_path) not in response.text  # no local paths for the client
        assert "symbolic link" in caplog.text
        assert c.get("/broken/1").status_code == 200


def test_default_cache_is_a_temp_dir_removed_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    fake_module(tmp_path / "root" / "m" / "1")
    with serve_in_thread(create_app(tmp_path / "root")) as base:
        assert download(f"{base}/m/1")[:2] == b"\x1f\x8b"
        assert [p.name.startswith("asynchub-serve-") for p in temp.iterdir()] == [True]
    assert list(temp.iterdir()) == []


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="not a directory"):
        create_app(tmp_path / "missing")


CLI = [sys.executable, "-m", "asynchub.cli"]


def cli_env() -> dict[str, str]:
    """The environment for `python -m asynchub.cli`, finding this checkout's package."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve(tmp_path: Path) -> None:
    fake_module(tmp_path / "root" / "cli" / "1")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asynchub.cli",
            "serve",
            str(tmp_path / "root"),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert response.status_code == 200
        assert "href='/cli/1'" in response.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0


def test_cli_serve_missing_root_fails_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [*CLI, "serve", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr


# -- HTTP to the letter (RFC 9110), on a prebuilt archive (no TensorFlow needed) ------------


@dataclass
class Archive:
    base: str
    data: bytes  # the bytes of ROOT/r/1.tar.gz


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("rfc9110")
    module = fake_module(tmp / "src" / "1", os.urandom(20_000))  # incompressible: ~20 kB
    data = pack(module, tmp / "root" / "r" / "1.tar.gz").read_bytes()
    fake_module(tmp / "root" / "d" / "1")
    with serve_in_thread(create_app(tmp / "root", cache_dir=tmp / "cache")) as base:
        yield Archive(base, data)


def get(archive: Archive, headers: dict[str, Any], method: str = "GET") -> httpx.Response:
    return httpx.request(
        method, f"{archive.base}/r/1", params=COMPRESSED, headers=headers, timeout=30
    )


def test_ranges(archive: Archive) -> None:
    data, size = archive.data, len(archive.data)
    for value, (start, end) in {
        "bytes=10-109": (10, 110),
        "bytes=-50": (size - 50, size),
        f"bytes=-{size * 2}": (0, size),  # a suffix longer than the archive: all of it
        "bytes=100-": (100, size),
        f"bytes=5-{size * 3}": (5, size),  # a last position past the end is cut
        "BYTES = 0-0": (0, 1),
        "bytes=0-9,10-19": (0, 20),  # adjacent ranges, merged
        "bytes=0-9,,5-14": (0, 15),  # an empty list element, overlapping ranges
        f"bytes=0-9,{size}-": (0, 10),  # the unsatisfiable one left out
    }.items():
        response = get(archive, {"Range": value})
        assert response.status_code == 206, value
        assert response.content == data[start:end], value
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", value
        assert response.headers["content-length"] == str(end - start), value
        assert response.headers["content-type"] == "application/gzip"


def test_several_ranges_get_the_whole_archive(archive: Archive) -> None:
    response = get(archive, {"Range": "bytes=0-9,100-109"})
    assert response.status_code == 200  # RFC 9110 §14.2 lets a server send it all
    assert response.content == archive.data
    assert "content-range" not in response.headers


def test_an_invalid_range_is_ignored(archive: Archive) -> None:
    for value in (
        "bytes=abc",
        "items=0-9",
        "bytes=9-0",
        "bytes=0-9,x",
        "bytes=-",
        "bytes=",
        "bytes 0-9",
        "bytes=0-\u00b9".encode("latin-1"),  # "¹": str.isdigit, but not a digit here
        "bytes=+1-2",
    ):
        response = get(archive, {"Range": value})
        assert response.status_code == 200, value
        assert response.content == archive.data, value


def test_an_unsatisfiable_range_is_416(archive: Archive) -> None:
    size = len(archive.data)
    for value in (f"bytes={size}-", f"bytes={size}-{size + 5}", "bytes=-0", f"bytes={size * 2}-"):
        response = get(archive, {"Range": value})
        assert response.status_code == 416, value
        assert response.headers["content-range"] == f"bytes */{size}"
        assert "bytes" in response.text


def test_if_range_validators(archive: Archive) -> None:
    head = get(archive, {}, "HEAD").headers
    etag, modified = head["etag"], head["last-modified"]
    for validator, ranged in {
        etag: True,
        modified: True,
        f"W/{etag}": False,  # If-Range compares strongly: a weak tag never matches
        '"stale"': False,
        "Mon, 01 Jan 2001 00:00:00 GMT": False,
        "not a date": False,
    }.items():
        response = get(archive, {"Range": "bytes=5-9", "If-Range": validator})
        assert response.status_code == (206 if ranged else 200), validator
        assert response.content == (archive.data[5:10] if ranged else archive.data)


def test_preconditions(archive: Archive) -> None:
    head = get(archive, {}, "HEAD").headers
    etag, modified = head["etag"], head["last-modified"]
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    for headers, status in [
        ({"If-None-Match": f'"a,b", W/{etag}'}, 304),  # a comma inside a tag, a weak match
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Modified-Since": modified}, 304),
        ({"If-Modified-Since": old}, 200),
        ({"If-None-Match": '"other"', "If-Modified-Since": modified}, 200),  # ETag first
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": f"W/{etag}"}, 412),  # If-Match compares strongly
        ({"If-Match": f'"other", {etag}'}, 200),
        ({"If-Match": "*"}, 200),
        ({"If-Unmodified-Since": old}, 412),
        ({"If-Unmodified-Since": modified}, 200),
        ({"If-Match": '"other"', "If-None-Match": etag}, 412),
    ]:
        for method in ("GET", "HEAD"):
            response = get(archive, headers, method)
            assert response.status_code == status, (headers, method)
            if status == 304:
                assert response.content == b""
                assert response.headers["etag"] == etag
            if status == 200 and method == "GET":
                assert response.content == archive.data


def test_head_is_get_without_a_body(archive: Archive) -> None:
    size = len(archive.data)
    for headers in ({}, {"Range": "bytes=3-7"}, {"Range": f"bytes={size}-"}):
        got, head = get(archive, headers), get(archive, headers, "HEAD")
        assert head.status_code == got.status_code
        assert head.content == b""
        for name in ("content-length", "content-type", "content-range", "etag", "accept-ranges"):
            assert head.headers.get(name) == got.headers.get(name), (headers, name)
    for path in ("/", "/r/1"):
        got = httpx.get(archive.base + path, timeout=30)
        head = httpx.head(archive.base + path, timeout=30)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == got.headers["content-length"]


def test_other_methods_are_405_with_allow(archive: Archive) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/r/1?tf-hub-format=compressed", "/d/1", "/"):
            response = httpx.request(method, archive.base + path, timeout=30)
            assert response.status_code == 405, (method, path)
            assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
            assert f"{method} is not allowed here" in response.text


def test_download_headers(archive: Archive) -> None:
    response = get(archive, {})
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="r-1.tar.gz"'
    assert response.headers["last-modified"].endswith(" GMT")
    packed = httpx.get(f"{archive.base}/d/1", params=COMPRESSED, timeout=30)
    assert packed.status_code == 200
    assert packed.headers["accept-ranges"] == "bytes"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_downloads_leave_no_file_open(archive: Archive) -> None:
    etag = get(archive, {}, "HEAD").headers["etag"]
    size = len(archive.data)
    kinds = [
        ({}, "GET"),
        ({}, "HEAD"),
        ({"If-None-Match": etag}, "GET"),
        ({"If-Match": '"other"'}, "GET"),
        ({"Range": f"bytes={size}-"}, "GET"),
        ({"Range": "bytes=0-9"}, "GET"),
    ]
    for headers, method in kinds:  # warm up: connections, threads, memos
        get(archive, headers, method)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        for headers, method in kinds:
            get(archive, headers, method)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
