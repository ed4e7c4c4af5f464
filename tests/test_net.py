"""The hub's own transport (asynchub/_sources/net.py): large socket reads, shared TLS context.

Real sockets on 127.0.0.1 throughout: a plain TCP server for the read size, the
tests' HTTP server for whole downloads, and a TLS server with a throwaway CA
(trustme) for the https path, whose streams are wrapped after ``start_tls``.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpcore
import httpx
import pytest

import asynchub
from asynchub._sources import net as _net
from tests._archives import make_module, tar_bytes, tree
from tests._httpserver import Server

pytestmark = pytest.mark.anyio


def _sender(payload: bytes) -> tuple[socket.socket, threading.Thread]:
    """A one-shot TCP server on 127.0.0.1 that sends ``payload`` at once, then waits."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.done = done  # type: ignore[attr-defined]
    return listener, thread


async def test_a_read_takes_what_the_socket_holds_not_64_kib() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, sent in one go
    listener, thread = _sender(payload)
    port = listener.getsockname()[1]
    try:
        stream = await _net.LargeReads(httpcore.AnyIOBackend()).connect_tcp("127.0.0.1", port)
        got = b""
        largest = 0
        with anyio.fail_after(10):
            while len(got) < len(payload):
                await anyio.sleep(0.05)  # let the kernel queue more than one read's worth
                chunk = await stream.read(64 * 1024, timeout=5)
                largest = max(largest, len(chunk))
                got += chunk
        await stream.aclose()
    finally:
        thread.done.set()  # type: ignore[attr-defined]
        listener.close()
    assert got == payload
    # httpcore asks for 64 KiB; the wrapper asks the socket for up to READ_SIZE.
    assert largest > 64 * 1024


async def test_the_hubs_own_transport_reads_large_and_a_given_one_is_kept(
    cache_dir: Path,
) -> None:
    async with asynchub.AsyncHub(cache_dir=cache_dir) as hub:
        # If httpx or httpcore move the attributes this relies on, this fails
        # (downloads would still work, with httpcore's 64 KiB reads).
        assert _net.large_reads(hub._client._transport)  # type: ignore[union-attr]
    given = httpx.AsyncHTTPTransport()
    async with asynchub.AsyncHub(cache_dir=cache_dir, transport=given) as hub:
        assert hub._client._transport is given  # type: ignore[union-attr]


async def test_a_download_through_large_reads_is_byte_exact(
    server: Server, cache_dir: Path, tmp_path: Path
) -> None:
    body = tar_bytes(make_module(tmp_path / "m", weights=3_000_000))
    url = server.add("/m", body=body)
    async with asynchub.AsyncHub(cache_dir=cache_dir) as hub:
        path = await hub.resolve(url)
        record = await hub.lock_entry(url)
    assert record.sha256 == hashlib.sha256(body).hexdigest()
    assert tree(path) == tree(tmp_path / "m")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, bytes]]:
    """An https server on 127.0.0.1 serving one module archive; yields (url, CA file, bytes)."""
    import http.server

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    body = tar_bytes(make_module(tmp_path / "tls", weights=2_000_000))

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/m", ca_file, body
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_https_goes_through_the_wrapped_tls_stream(
    tls_server: tuple[str, Path, bytes], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca_file, body = tls_server
    # The process's TLS context is made once, from httpx's defaults (SSL_CERT_FILE here).
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    _net.ssl_context.cache_clear()
    try:
        async with asynchub.AsyncHub(cache_dir=cache_dir) as hub:
            path = await hub.resolve(url)
            record = await hub.lock_entry(url)
    finally:
        _net.ssl_context.cache_clear()
    assert (path / "saved_model.pb").is_file()
    assert record.sha256 == hashlib.sha256(body).hexdigest()


async def test_https_refuses_a_server_the_context_does_not_trust(
    tls_server: tuple[str, Path, bytes], cache_dir: Path
) -> None:
    url, _, _ = tls_server
    _net.ssl_context.cache_clear()
    async with asynchub.AsyncHub(cache_dir=cache_dir, retries=0) as hub:
        with pytest.raises(asynchub.NetworkError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await hub.resolve(url)
    # Nothing is left behind: no entry, no tmp dir, no lock.
    assert not cache_dir.exists() or [p.name for p in cache_dir.iterdir()] == []
