"""Host modules over HTTP the TF Hub way: an ASGI app (starlette), served by ``asynchub serve``.

``ROOT`` holds modules as ``NAME/VERSION/`` SavedModel directories and/or prebuilt
``NAME/VERSION.tar.gz`` archives; ``NAME`` may contain slashes (``google/mnist/1`` is
module ``google/mnist``, version ``1``). When both exist the prebuilt archive wins: the
publisher made it on purpose (``repository.py`` finds them). Directories are packed on
demand with :func:`pack` into a cache keyed by the directory's fingerprint.

- ``GET /NAME/VERSION?tf-hub-format=compressed``: the ``tar.gz`` (``application/gzip``),
  streamed, with ``Content-Length``, a strong ``ETag`` (the archive's SHA-256),
  ``If-None-Match`` (304), ``Range``/``If-Range`` (206/416) and ``HEAD``.
- ``GET /NAME/VERSION``: an HTML page about the module (signatures, size, how to load it).
- ``GET /``: an HTML index of the modules.

With ``infer=InferOptions(...)`` (``asynchub serve --infer``) the same app also answers
predictions over the Open Inference Protocol under ``/v2`` (``infer.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import importlib
import importlib.util
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread

from .._pack import MODULE_MARKERS, fingerprint, pack
from ..errors import HubError, MissingDependencyError, ModuleError
from .options import InferOptions
from .repository import ARCHIVE_SUFFIX, ModuleSource, locate, scan, split_module_path

try:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        PlainTextResponse,
        Response,
    )
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised without the server extra only
    raise MissingDependencyError(
        f'hosting modules needs the server extra ({exc}): pip install "asynchub[server]"'
    ) from exc

__all__ = [
    "ARCHIVE_MEDIA_TYPE",
    "FORMATS",
    "create_app",
    "etag_matches",
    "requested_formats",
    "serve_in_thread",
]

logger = logging.getLogger("asynchub.server")

#: The ``tf-hub-format`` values this server answers.
FORMATS = ("compressed",)
#: gzip is what the bytes are; a tar type would invite proxies to compress them again.
ARCHIVE_MEDIA_TYPE = "application/gzip"
# Clients may store the archive but must revalidate it (cheap: ETag -> 304), because a
# directory under ROOT can change under the same URL.
_CACHE_CONTROL = "no-cache"
_HASH_CHUNK = 1 << 20
# saved_model.pb read from a prebuilt archive for the HTML page, at most this big.
_MAX_GRAPH_BYTES = 256 << 20
_MEMO_LIMIT = 1024


# -- pure logic ---------------------------------------------------------------------------


def requested_formats(values: list[str]) -> list[str]:
    """The formats a client accepts: each ``tf-hub-format`` value is a comma-separated list."""
    return [f.strip().lower() for value in values for f in value.split(",") if f.strip()]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` semantics: ``*`` or any listed tag, compared weakly (RFC 9110)."""
    if if_none_match is None:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# -- signatures, read from saved_model.pb --------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    key: str
    dtype: str
    shape: str


@dataclass(frozen=True)
class _Signature:
    name: str
    inputs: tuple[_Tensor, ...]
    outputs: tuple[_Tensor, ...]


@dataclass(frozen=True)
class _Description:
    size: str
    signatures: tuple[_Signature, ...]
    note: str | None  # why no signatures are shown


def _describe_graph(data: bytes, *, text: bool) -> tuple[_Signature, ...]:
    """The signatures of a serialized SavedModel, parsed without loading the graph."""
    from .._tf import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    if text:
        # protobuf ships no type stubs; imported by name to keep it an Any.
        text_format = importlib.import_module("google.protobuf.text_format")
        text_format.Parse(data.decode("utf-8"), saved_model)
    else:
        saved_model.ParseFromString(data)
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        return ()
    meta = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])

    def dtype_name(value: int) -> str:
        try:
            return str(tf.dtypes.as_dtype(value).name)
        except (TypeError, ValueError):
            return f"dtype {value}"

    def shape_text(shape: Any) -> str:
        if shape.unknown_rank:
            return "unknown rank"
        dims = ["None" if d.size < 0 else str(d.size) for d in shape.dim]
        return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"

    def tensors(infos: Any) -> tuple[_Tensor, ...]:
        return tuple(
            _Tensor(key, dtype_name(infos[key].dtype), shape_text(infos[key].tensor_shape))
            for key in sorted(infos)
        )

    return tuple(
        _Signature(name, tensors(sig.inputs), tensors(sig.outputs))
        for name, sig in sorted(meta.signature_def.items())
        if not name.startswith("__")  # __saved_model_init_op and the like
    )


def _graph_from_dir(directory: Path) -> tuple[bytes, bool] | None:
    for marker in MODULE_MARKERS:
        path = directory / marker
        if path.is_file():
            return path.read_bytes(), marker.endswith(".pbtxt")
    return None


def _graph_from_archive(archive: Path) -> tuple[bytes, bool] | None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in MODULE_MARKERS and member.isfile() and member.size <= _MAX_GRAPH_BYTES:
                f = tar.extractfile(member)
                if f is not None:
                    return f.read(), name.endswith(".pbtxt")
    return None


def _describe(source: ModuleSource) -> _Description:
    """Size and signatures of a module, for its HTML page (blocking: run in a thread)."""
    if source.prebuilt:
        size = f"{_human_size(source.path.stat().st_size)}, compressed"
    else:
        files = [p for p in source.path.resolve().rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        size = f"{_human_size(total)} in {len(files)} files, uncompressed"
    try:
        graph = (
            _graph_from_archive(source.path) if source.prebuilt else _graph_from_dir(source.path)
        )
        if graph is None:
            return _Description(size, (), "no saved_model.pb was found")
        return _Description(size, _describe_graph(graph[0], text=graph[1]), None)
    except MissingDependencyError:
        return _Description(
            size, (), 'signatures need TensorFlow on the server: pip install "asynchub[tensorflow]"'
        )
    except Exception as exc:  # a corrupt graph or archive must not break the page
        logger.warning("cannot read the signatures of %s: %s", source.id, exc)
        return _Description(size, (), f"saved_model.pb could not be read: {exc}")


# -- HTML -----------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;margin:.5rem 0 1.5rem}"
    "td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}"
    "pre{background:#f4f4f4;padding:.75rem;overflow-x:auto}"
)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _module_page(source: ModuleSource, info: _Description, url: str, base: str) -> str:
    e = html.escape
    snippet = f'import asynchub as hub\n\nm = hub.load("{url}")'
    parts = [
        f"<h1>{e(source.name)} <small>version {e(source.version)}</small></h1>",
        f"<p>{'Prebuilt archive' if source.prebuilt else 'SavedModel directory'}, "
        f"{e(info.size)}. <a href='?tf-hub-format=compressed'>Download</a> the "
        "<code>tar.gz</code>.</p>",
        "<h2>Use it</h2>",
        f"<pre><code>{e(snippet)}</code></pre>",
        "<h2>Signatures</h2>",
    ]
    if info.note:
        parts.append(f"<p>{e(info.note)}</p>")
    elif not info.signatures:
        parts.append("<p>This module has no signatures.</p>")
    for sig in info.signatures:
        parts.append(f"<h3><code>{e(sig.name)}</code></h3>")
        parts.append("<table><tr><th></th><th>name</th><th>dtype</th><th>shape</th></tr>")
        for kind, tensors in (("input", sig.inputs), ("output", sig.outputs)):
            for t in tensors:
                parts.append(
                    f"<tr><td>{kind}</td><td><code>{e(t.key)}</code></td>"
                    f"<td>{e(t.dtype)}</td><td>{e(t.shape)}</td></tr>"
                )
        parts.append("</table>")
    parts.append(f"<p><a href='{e(base)}/'>All modules</a></p>")
    return _page(f"{source.id} - asynchub", "\n".join(parts))


def _index_page(sources: list[ModuleSource], base: str) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td><a href='{e(base + '/' + quote(s.id))}'>{e(s.name)}</a></td>"
        f"<td>{e(s.version)}</td><td>{'archive' if s.prebuilt else 'directory'}</td></tr>"
        for s in sources
    )
    body = "<h1>Modules</h1>\n" + (
        f"<table><tr><th>name</th><th>version</th><th>source</th></tr>\n{rows}\n</table>"
        if sources
        else "<p>No modules yet: add NAME/VERSION/ directories or NAME/VERSION.tar.gz files.</p>"
    )
    return _page("Modules - asynchub", body)


# -- the app --------------------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[os.stat_result, str]:
    """The file's stat and strong ETag (its SHA-256), from one open file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return st, f'"{digest.hexdigest()[:40]}"'


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _memo_put(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()  # a server rarely hosts this many; forgetting only costs a rehash
    memo[key] = value


class _Host:
    """The state of one app: ROOT, the pack cache and memoized ETags and pages."""

    def __init__(self, root: Path, cache_dir: Path | None) -> None:
        self.root = root
        self._cache_dir = cache_dir
        self._own_cache: weakref.finalize[..., Any] | None = None
        self._locks: dict[str, anyio.Lock] = {}
        self._packed: dict[str, tuple[str, Path]] = {}  # id -> (fingerprint, archive)
        self._etags: dict[tuple[int, int, int, int], str] = {}
        self._pages: dict[Any, _Description] = {}

    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            own = tempfile.mkdtemp(prefix="asynchub-serve-")
            # Removed at shutdown (lifespan), else when the app is collected or Python
            # exits: servers run with lifespan off must not leave it behind either.
            self._own_cache = weakref.finalize(self, shutil.rmtree, own, ignore_errors=True)
            self._cache_dir = Path(own)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        return self._cache_dir

    def close(self) -> None:
        if self._own_cache is not None:
            self._own_cache()
            self._own_cache = self._cache_dir = None
            self._packed.clear()

    async def archive(self, source: ModuleSource) -> Path:
        """The archive to send: the prebuilt file, or the directory packed into the cache."""
        if source.prebuilt:
            return source.path
        current = await anyio.to_thread.run_sync(fingerprint, source.path)
        cached = self._packed.get(source.id)
        if cached is not None and cached[0] == current and cached[1].is_file():
            return cached[1]
        # One pack per module at a time; the others wait and reuse its result.
        lock = self._locks.setdefault(source.id, anyio.Lock())
        async with lock:
            for _attempt in range(3):
                cached = self._packed.get(source.id)
                if cached is not None and cached[0] == current and cached[1].is_file():
                    return cached[1]
                key = hashlib.sha1(source.id.encode()).hexdigest()[:16]
                target = self.cache_dir() / f"{key}-{current[:32]}{ARCHIVE_SUFFIX}"
                if not target.is_file():  # else a previous run's, in a kept --cache-dir
                    await anyio.to_thread.run_sync(pack, source.path, target)
                    after = await anyio.to_thread.run_sync(fingerprint, source.path)
                    if after != current:  # the directory changed while it was packed
                        target.unlink(missing_ok=True)
                        current = after
                        continue
                self._packed[source.id] = (current, target)
                if cached is not None and cached[1] != target:
                    cached[1].unlink(missing_ok=True)
                return target
        raise ModuleError(f"{source.id} kept changing while it was packed")

    async def etag(self, path: Path) -> tuple[os.stat_result, str]:
        st = await anyio.to_thread.run_sync(os.stat, path)
        cached = self._etags.get(_stat_key(st))
        if cached is not None:
            return st, cached
        st, etag = await anyio.to_thread.run_sync(_hash_file, path)
        _memo_put(self._etags, _stat_key(st), etag)
        return st, etag

    async def describe(self, source: ModuleSource) -> _Description:
        key: Any = None
        if source.prebuilt:
            key = ("archive", source.id, _stat_key(source.path.stat()))
        else:
            with contextlib.suppress(HubError):  # unpackable: described, not memoized
                key = ("dir", source.id, await anyio.to_thread.run_sync(fingerprint, source.path))
        info = self._pages.get(key) if key is not None else None
        if info is None:
            info = await anyio.to_thread.run_sync(_describe, source)
            if key is not None:
                _memo_put(self._pages, key, info)
        return info


def _base(request: Request) -> str:
    """The app's own URL path prefix (non-empty when mounted below another app)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _not_found() -> Response:
    return PlainTextResponse("No such module here; / lists the modules.\n", status_code=404)


def create_app(
    root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    infer: InferOptions | bool = False,
) -> Starlette:
    """An ASGI app serving the modules under ``root`` (see the module docstring).

    ``cache_dir`` keeps directories packed on demand; by default a temp dir, created on
    first use and removed at shutdown (ASGI lifespan). ``infer`` (``True`` for the
    defaults) adds the Open Inference Protocol's ``/v2`` routes, which need TensorFlow.
    Raises :class:`ModuleError` when ``root`` is not a directory.
    """
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise ModuleError(f"the module root {root_path} is not a directory")
    host = _Host(root_path, Path(cache_dir).absolute() if cache_dir is not None else None)
    inference = None
    if infer is not False:
        if importlib.util.find_spec("tensorflow") is None:
            raise MissingDependencyError(
                'answering predictions (infer) needs TensorFlow: pip install "asynchub[tensorflow]"'
            )
        from .infer import Inference

        inference = Inference(root_path, InferOptions() if infer is True else infer)
    # ops hook: the app's metrics (/metrics) and drain state. Imported here, as infer is:
    # prometheus_client costs ~35 ms to import.
    from .ops import Ops, OpsMiddleware

    ops = Ops(infer=inference is not None)
    if inference is not None:
        inference.ops = ops

    async def index(request: Request) -> Response:
        sources = await anyio.to_thread.run_sync(scan, host.root)
        return HTMLResponse(_index_page(sources, _base(request)))

    async def module(request: Request) -> Response:
        parsed = split_module_path(request.path_params["path"])
        if parsed is None:
            return _not_found()
        source = await anyio.to_thread.run_sync(locate, host.root, *parsed)
        if source is None:
            return _not_found()
        if "tf-hub-format" not in request.query_params:
            try:
                info = await host.describe(source)
            except FileNotFoundError:  # removed since it was located
                return _not_found()
            url = str(request.url.replace(query="", fragment=""))
            return HTMLResponse(_module_page(source, info, url, _base(request)))
        formats = requested_formats(request.query_params.getlist("tf-hub-format"))
        if not any(f in FORMATS for f in formats):
            return PlainTextResponse(
                f"Unsupported tf-hub-format {','.join(formats) or '(empty)'!r}; "
                f"this server offers: {', '.join(FORMATS)}.\n",
                status_code=400,
            )
        for _attempt in range(3):
            try:
                archive = await host.archive(source)
                st, etag = await host.etag(archive)
                break
            except FileNotFoundError:
                # Replaced by its publisher, or repacked by a request that saw the
                # directory change: look it up again.
                source = await anyio.to_thread.run_sync(locate, host.root, *parsed)
                if source is None:
                    return _not_found()
            except HubError as exc:
                # The details (paths on this machine) go to the log, not to the client.
                logger.error("cannot pack %s: %s", source.id, exc)
                return PlainTextResponse(
                    f"Cannot pack {source.id}; the server's log says why.\n", status_code=500
                )
        else:
            return PlainTextResponse(
                f"{source.id} keeps changing; try again later.\n", status_code=503
            )
        headers = {"ETag": etag, "Cache-Control": _CACHE_CONTROL}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        # FileResponse streams in chunks and does HEAD, Range (206/416) and If-Range
        # against the ETag given here; only If-None-Match is left to us.
        return FileResponse(
            archive,
            stat_result=st,
            media_type=ARCHIVE_MEDIA_TYPE,
            headers=headers,
            filename=f"{source.name.replace('/', '-')}-{source.version}{ARCHIVE_SUFFIX}",
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if inference is not None:
                await inference.start()
            yield
        finally:
            host.close()
            if inference is not None:
                await inference.close()

    app = Starlette(
        routes=[
            *(inference.routes() if inference is not None else ()),
            Route("/", index, methods=["GET"]),
            Route("/{path:path}", module, methods=["GET"]),
        ],
        middleware=[Middleware(OpsMiddleware, ops=ops)],  # ops hook
        lifespan=lifespan,
    )
    app.state.ops = ops  # ops hook: asynchub serve drains through it (drain.py)
    return app


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread; yield its base URL; stop it on exit.

    ``port=0`` picks a free port. For notebooks, tests and the demo: a
    production server is ``asynchub serve``.
    """
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{bound} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{bound}" if ":" not in host else f"http://[{host}]:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
