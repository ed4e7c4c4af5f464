"""A real HTTP server on 127.0.0.1 whose answers each test programs.

Built on the standard library's ThreadingHTTPServer so tests control every
byte: statuses in sequence, redirects, Range answers, bodies cut mid-stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "application/gzip"
    #: Statuses answered before the body, one per request (e.g. [503, 503]).
    fail_first: list[int] = field(default_factory=list)
    retry_after: str | None = None
    #: Answer this status with no body, always (e.g. 404).
    status: int | None = None
    redirect: str | None = None
    ranges: bool = True
    etag: bool = True
    #: Close the connection after this many body bytes, for the first N GETs.
    cut_at: int | None = None
    cut_times: int = 1
    delay: float = 0.0  #: seconds before answering
    chunk: int = 64 * 1024
    throttle: float = 0.0  #: seconds between chunks
    #: Send no Content-Length: the body ends when the connection closes.
    no_length: bool = False
    #: Stop sending after this many body bytes, for ``stall_for`` seconds, the first
    #: ``stall_times`` GETs (then finish, unless the client gave up).
    stall_at: int | None = None
    stall_for: float = 0.0
    stall_times: int = 1
    #: Hold every GET's body (after its headers) until this event is set, for at
    #: most ``gate_timeout`` seconds.
    gate: threading.Event | None = None
    gate_timeout: float = 120.0
    #: Serve this body (a new version, with its own ETag) from the first Range
    #: request on, ignoring If-Range: a server that would splice two versions.
    next_body: bytes | None = None
    spliced: bool = False  #: set once ``next_body`` took over


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, **kwargs: object) -> str:
        self.routes[path] = Route(**kwargs)  # type: ignore[arg-type]
        return self.url(path)

    def gets(self, path: str) -> list[dict[str, str]]:
        """Headers of each GET on ``path`` (query ignored)."""
        return [h for (m, p, h) in self.requests if m == "GET" and urlsplit(p).path == path]

    def queries(self, path: str) -> list[str]:
        return [urlsplit(p).query for (m, p, _) in self.requests if urlsplit(p).path == path]

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _make_handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            with server._lock:
                server.requests.append((self.command, self.path, dict(self.headers.items())))
                server.active += 1
                server.max_active = max(server.max_active, server.active)
            try:
                self._answer(head)
            finally:
                with server._lock:
                    server.active -= 1

        def _answer(self, head: bool) -> None:
            path = urlsplit(self.path).path
            route = server.routes.get(path)
            if route is None:
                return self._plain(404, b"not found")
            if route.delay:
                time.sleep(route.delay)
            if route.redirect:
                self.send_response(302)
                self.send_header("Location", route.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if route.fail_first:
                status = route.fail_first.pop(0)
                extra = {"Retry-After": route.retry_after} if route.retry_after else {}
                return self._plain(status, b"try later", extra)
            if route.status:
                return self._plain(route.status, b"error page")
            range_header = self.headers.get("Range")
            if route.next_body is not None and range_header:
                route.body, route.next_body, route.spliced = route.next_body, None, True
            body = route.body
            etag = '"' + hashlib.sha1(body).hexdigest() + '"'
            start = 0
            status = 200
            if route.ranges and range_header and range_header.startswith("bytes="):
                if_range = self.headers.get("If-Range")
                if if_range is None or if_range == etag or route.spliced:
                    start = int(range_header[6:].split("-")[0])
                    status = 206
            self.send_response(status)
            self.send_header("Content-Type", route.content_type)
            if route.no_length:
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body) - start))
            if route.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if route.etag:
                self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if head:
                return None
            cut = None
            if route.cut_at is not None and route.cut_times > 0 and start == 0:
                route.cut_times -= 1
                cut = route.cut_at
            end = len(body) if cut is None else cut
            pos = start
            stall = None
            if route.stall_at is not None and route.stall_times > 0 and start <= route.stall_at:
                route.stall_times -= 1
                stall = route.stall_at
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if route.gate is not None:
                    self.wfile.flush()
                    route.gate.wait(route.gate_timeout)
                while pos < end:
                    if stall is not None and pos >= stall:
                        self.wfile.flush()
                        time.sleep(route.stall_for)
                        stall = None
                    limit = end if stall is None else min(end, stall)
                    piece = body[pos : min(limit, pos + route.chunk)]
                    self.wfile.write(piece)
                    pos += len(piece)
                    if route.throttle:
                        time.sleep(route.throttle)
                self.wfile.flush()
            if cut is not None:
                self.close_connection = True
            return None

        def _plain(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def running() -> Iterator[Server]:
    server = Server().start()
    try:
        yield server
    finally:
        server.stop()
