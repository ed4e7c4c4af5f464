"""Host modules over HTTP the TF Hub way: an ASGI app (starlette), served by ``asynchub serve``.

``ROOT`` holds modules as ``NAME/VERSION/`` SavedModel directories and/or prebuilt
``NAME/VERSION.tar.gz`` archives; ``NAME`` may contain slashes (``google/mnist/1`` is
module ``google/mnist``, version ``1``). When both exist the prebuilt archive wins: the
publisher made it on purpose (``repository.py`` finds them). Directories are packed on
demand with :func:`pack` into a cache keyed by the directory's fingerprint.

- ``GET /NAME/VERSION?tf-hub-format=compressed``: the ``tar.gz`` (``application/gzip``),
  streamed, with ``Content-Length``, a strong ``ETag`` (the archive's SHA-256) and
  ``Last-Modified``, and RFC 9110's conditionals and ranges: ``If-Match`` and
  ``If-Unmodified-Since`` (412), ``If-None-Match`` and ``If-Modified-Since`` (304),
  ``Range`` with ``If-Range`` (206/416; an invalid ``Range`` is ignored), ``HEAD``.
  Other methods get 405 with ``Allow``.
- ``GET /NAME/VERSION``: an HTML page about the module (``pages.py``).
- ``GET /``: an HTML index of the modules, each listed once with its versions.

With ``infer=InferOptions(...)`` (``asynchub serve --infer``) the same app also answers
predictions over the Open Inference Protocol under ``/v2`` (``infer.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread

from .._pack import fingerprint, pack
from ..errors import HubError, MissingDependencyError, ModuleError
from . import pages
from .options import InferOptions
from .repository import (
    ARCHIVE_SUFFIX,
    ModuleSource,
    is_whole,
    latest,
    locate,
    scan,
    split_module_path,
    versions,
)

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
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
_SEND_CHUNK = 256 << 10
_MEMO_LIMIT = 1024


# -- pure logic ---------------------------------------------------------------------------


def requested_formats(values: list[str]) -> list[str]:
    """The formats a client accepts: each ``tf-hub-format`` value is a comma-separated list."""
    return [f.strip().lower() for value in values for f in value.split(",") if f.strip()]


# -- HTTP to the letter (RFC 9110): validators, preconditions, ranges -------------------------

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def _entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """An ``If-Match``/``If-None-Match`` list as ``(weak, tag)`` pairs; ``None`` for ``*``.

    Tags are read whole, so a comma inside one does not split it; a malformed list
    yields the tags before the fault (a missing tag never matches).
    """
    if value.strip() == "*":
        return None
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(value):
        if not value[position:].strip(" \t,"):
            break
        if value[position] in " \t,":
            position += 1  # empty list elements are allowed (RFC 9110 §5.6.1)
            continue
        match = _ETAG.match(value, position)
        if match is None:
            break
        tags.append((match[1] is not None, match[2]))
        position = match.end()
    return tags


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` semantics: ``*`` or any listed tag, compared weakly (RFC 9110)."""
    if if_none_match is None:
        return False
    tags = _entity_tags(if_none_match)
    return tags is None or any(tag == etag for _weak, tag in tags)


def _strong_match(if_match: str, etag: str) -> bool:
    tags = _entity_tags(if_match)
    return tags is None or any(not weak and tag == etag for weak, tag in tags)


def _http_date(value: str | None) -> int | None:
    """An HTTP-date as Unix seconds; ``None`` when absent or not a date (then ignored)."""
    if value is None:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000", or no zone at all: HTTP dates are GMT
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def _parse_range(value: str, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable byte ranges of a ``Range`` value, as ``[start, end)``, sorted and
    merged; ``[]`` when none is satisfiable (416); ``None`` when the field is to be ignored
    (not bytes, or not valid: RFC 9110 §14.2 sends the whole representation then)."""
    unit, equals, ranges_set = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    found: list[tuple[int, int]] = []
    specs = [s.strip() for s in ranges_set.split(",")]
    if not any(specs):
        return None
    for spec in specs:
        if not spec:
            continue  # an empty list element
        first, dash, last = spec.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not all(p.isascii() and p.isdigit() for p in (first, last) if p):
            return None
        if not first:
            if not last:
                return None
            suffix = int(last)
            if suffix > 0 and size > 0:
                found.append((max(size - suffix, 0), size))
            continue
        start = int(first)
        if last and int(last) < start:
            return None
        if start < size:
            found.append((start, min(int(last) + 1, size) if last else size))
    found.sort()
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class _Answer:
    """What a download request gets, decided from its headers before a byte is read."""

    status: int  # 200, 206, 304, 412 or 416
    start: int = 0
    end: int = 0


def _decide(headers: Any, method: str, etag: str, mtime: int, size: int) -> _Answer:
    """RFC 9110 §13.2.2's order: If-Match, If-Unmodified-Since, If-None-Match,
    If-Modified-Since, then Range with If-Range."""
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _strong_match(if_match, etag):
            return _Answer(412)
    else:
        since = _http_date(headers.get("if-unmodified-since"))
        if since is not None and mtime > since:
            return _Answer(412)
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            return _Answer(304)
    else:
        since = _http_date(headers.get("if-modified-since"))
        if since is not None and mtime <= since:
            return _Answer(304)
    whole = _Answer(200, 0, size)
    range_value = headers.get("range")
    if range_value is None or method not in ("GET", "HEAD"):
        return whole
    if_range = headers.get("if-range")
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(('"', "W/")):
            if if_range != etag:  # a strong comparison: a weak tag never matches
                return whole
        elif _http_date(if_range) != mtime:
            return whole
    ranges = _parse_range(range_value, size)
    if ranges is None:
        return whole
    if not ranges:
        return _Answer(416)
    if len(ranges) > 1:
        # Several disjoint ranges: the whole archive, as RFC 9110 §14.2 allows, rather
        # than multipart/byteranges (which no archive client asks for).
        return whole
    return _Answer(206, *ranges[0])


# -- the app --------------------------------------------------------------------------------


def _open_archive(
    path: Path, etags: dict[Any, str], prebuilt: bool
) -> tuple[int, os.stat_result, str]:
    """An open descriptor of ``path``, its stat and its strong ETag (the SHA-256 of these
    very bytes: a file renamed over ``path`` meanwhile cannot mix its bytes in).

    Raises ``FileNotFoundError`` for a prebuilt archive that is no longer whole (copied
    over in place since it was located), so that the caller looks it up again.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if prebuilt and not is_whole(path):
            raise FileNotFoundError(f"{path} is being rewritten")
        etag = etags.get(_stat_key(st))
        if etag is None:
            digest = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, _HASH_CHUNK, offset):
                digest.update(chunk)
                offset += len(chunk)
            etag = f'"{digest.hexdigest()[:40]}"'
            _memo_put(etags, _stat_key(st), etag)
        return fd, st, etag
    except BaseException:
        os.close(fd)
        raise


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
        self._pages: dict[Any, pages.Description] = {}

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

    async def open(self, path: Path, prebuilt: bool) -> tuple[int, os.stat_result, str]:
        """``path`` opened, with its stat and ETag (hashed once per stat)."""
        return await anyio.to_thread.run_sync(_open_archive, path, self._etags, prebuilt)

    async def describe(self, source: ModuleSource) -> pages.Description:
        key: Any = None
        if source.prebuilt:
            key = ("archive", source.id, _stat_key(source.path.stat()))
        else:
            with contextlib.suppress(HubError):  # unpackable: described, not memoized
                key = ("dir", source.id, await anyio.to_thread.run_sync(fingerprint, source.path))
        info = self._pages.get(key) if key is not None else None
        if info is None:
            info = await anyio.to_thread.run_sync(pages.describe, source)
            if key is not None:
                _memo_put(self._pages, key, info)
        return info


class _ArchiveResponse(Response):
    """Bytes ``[start, end)`` of an open archive, streamed; the descriptor is closed after.

    Stops reading when the client goes away (the server would go on accepting writes).
    """

    def __init__(self, fd: int, status: int, start: int, end: int, headers: dict[str, str]) -> None:
        super().__init__(
            status_code=status, headers={**headers, "Content-Length": str(end - start)}
        )
        self._fd, self._start, self._end = fd, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if scope["method"] == "HEAD" or self._start == self._end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    position = self._start
                    while position < self._end:
                        size = min(_SEND_CHUNK, self._end - position)
                        chunk = await anyio.to_thread.run_sync(os.pread, self._fd, size, position)
                        if not chunk:
                            raise ModuleError("the archive got shorter while it was sent")
                        position += len(chunk)
                        await send(
                            {
                                "type": "http.response.body",
                                "body": chunk,
                                "more_body": position < self._end,
                            }
                        )
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(watch)
        finally:
            os.close(self._fd)


def _disposition(filename: str) -> str:
    """``Content-Disposition`` for ``filename``: an ASCII fallback, and the UTF-8 name
    when it differs (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=utf-8''{quote(filename, safe='')}"


def _base(request: Request) -> str:
    """The app's own URL path prefix (non-empty when mounted below another app)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _not_found(message: str = "No such module here; / lists the modules.") -> Response:
    # Modules come and go under ROOT: a cache must ask again rather than keep this.
    headers = {"Cache-Control": "no-cache"}
    return PlainTextResponse(message + "\n", status_code=404, headers=headers)


def _half_copied(root: Path, name: str, version: str) -> bool:
    """Whether ``NAME/VERSION.tar.gz`` is there but not whole (``locate`` passed it over)."""
    archive = root / name / f"{version}{ARCHIVE_SUFFIX}"
    try:
        return archive.is_file() and archive.resolve().is_relative_to(root)
    except (OSError, ValueError, RuntimeError):
        return False


async def _missing(root: Path, name: str, version: str) -> Response:
    if await anyio.to_thread.run_sync(_half_copied, root, name, version):
        return _not_found(
            f"{name}/{version}{ARCHIVE_SUFFIX} is not whole yet (still being copied, or "
            "truncated), so that version is not served; ask again once it is complete. "
            "/ lists the versions there are."
        )
    return _not_found()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    """405 with the ``Allow`` header starlette's router computed, and a sentence."""
    headers = exc.headers if isinstance(exc, HTTPException) else None
    allowed = (headers or {}).get("Allow", "GET, HEAD")
    message = f"{request.method} is not allowed here; this URL answers {allowed}."
    if request.url.path.startswith("/v2/"):  # the protocol's error shape
        body = json.dumps({"error": message}).encode()
        return Response(body, 405, headers, media_type="application/json")
    return PlainTextResponse(message + "\n", 405, headers)


def _download(
    request: Request, source: ModuleSource, fd: int, st: os.stat_result, etag: str
) -> Response:
    """The answer to a download: the archive (or part of it) from ``fd``, else a status, by
    RFC 9110. Only an :class:`_ArchiveResponse` takes ``fd`` over."""
    mtime = int(st.st_mtime)
    headers = {
        "ETag": etag,
        "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
        "Cache-Control": _CACHE_CONTROL,
        "Accept-Ranges": "bytes",
    }
    answer = _decide(request.headers, request.method, etag, mtime, st.st_size)
    if answer.status in (200, 206):
        filename = f"{source.name.replace('/', '-')}-{source.version}{ARCHIVE_SUFFIX}"
        headers["Content-Type"] = ARCHIVE_MEDIA_TYPE
        headers["Content-Disposition"] = _disposition(filename)
        if answer.status == 206:
            headers["Content-Range"] = f"bytes {answer.start}-{answer.end - 1}/{st.st_size}"
        return _ArchiveResponse(fd, answer.status, answer.start, answer.end, headers)
    if answer.status == 304:
        return Response(status_code=304, headers=headers)
    if answer.status == 416:
        headers["Content-Range"] = f"bytes */{st.st_size}"
        message = f"No byte of the range asked for is in the archive ({st.st_size} bytes).\n"
        return PlainTextResponse(message, status_code=416, headers=headers)
    message = (
        f"{source.id} is not the archive that If-Match or If-Unmodified-Since expects; "
        f"its ETag is now {etag}.\n"
    )
    return PlainTextResponse(message, status_code=412, headers=headers)


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
        by_name: dict[str, list[ModuleSource]] = {}
        for source in sources:
            by_name.setdefault(source.name, []).append(source)
        newest = {name: latest(found) for name, found in by_name.items()}
        page = pages.index(sources, newest, _base(request), infer=inference is not None)
        return HTMLResponse(page)

    async def module(request: Request) -> Response:
        parsed = split_module_path(request.path_params["path"])
        if parsed is None:
            return _not_found()
        source = await anyio.to_thread.run_sync(locate, host.root, *parsed)
        if source is None:
            return await _missing(host.root, *parsed)
        if "tf-hub-format" not in request.query_params:
            try:
                info = await host.describe(source)
            except FileNotFoundError:  # removed since it was located
                return _not_found()
            found = await anyio.to_thread.run_sync(versions, host.root, source.name)
            page = pages.module(
                source,
                info,
                url=str(request.url.replace(query="", fragment="")),
                base=_base(request),
                versions=found,
                latest=latest(found),
                infer=inference is not None,
            )
            return HTMLResponse(page)
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
                fd, st, etag = await host.open(archive, source.prebuilt)
                break
            except FileNotFoundError:
                # Replaced by its publisher, or repacked by a request that saw the
                # directory change: look it up again.
                source = await anyio.to_thread.run_sync(locate, host.root, *parsed)
                if source is None:
                    return await _missing(host.root, *parsed)
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
        try:
            response = _download(request, source, fd, st, etag)
        except BaseException:
            os.close(fd)
            raise
        if not isinstance(response, _ArchiveResponse):
            os.close(fd)  # else the response closes it once it is sent
        return response

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
        exception_handlers={405: _not_allowed},
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
