"""The hub's own HTTP transport: larger socket reads, one TLS context per process.

httpcore reads a response body 64 KiB at a time (``READ_NUM_BYTES``, a class
constant with no setting). Each read is a trip through anyio's stream, a cancel
scope with a timer for the read timeout, and h11's parser: about as much CPU on
the event loop, per byte, as ISA-L spends inflating it (benchmarks/README.md,
"What limits it"). asyncio's socket transport already receives up to 256 KiB per
``recv``; anyio then hands that out in 64 KiB slices, one loop turn each.

httpcore's documented extension point for this is the network backend
(https://www.encode.io/httpcore/network-backends/). Ours wraps the default one
and asks its streams for up to :data:`READ_SIZE` per read, so a read takes
whatever the socket has. Reading more than httpcore asked for is safe for
HTTP/1.1: h11 buffers what lies past a body, and a client sends no request on
a connection before the last response on it is read.

httpx has no argument for a pool's network backend, so it is set on the pool
the transport made (:func:`transport`). If a future httpx or httpcore moves
those attributes, the transport keeps httpcore's own reads: slower, never wrong
(``tests/test_net.py`` notices).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["READ_SIZE", "LargeReads", "ssl_context", "transport"]

#: Bytes asked of the socket per read: more than asyncio's 256 KiB per ``recv``,
#: so a read is never split into loop turns.
READ_SIZE = 1024 * 1024


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """The TLS context every hub of this process uses (httpx's defaults: certifi, SSL_CERT_*).

    Making one loads the CA bundle, about 20 ms: once per process, not per hub.
    """
    return httpx.create_ssl_context()


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class LargeReads(httpcore.AsyncNetworkBackend):
    """A network backend whose streams read up to :data:`READ_SIZE` bytes at a time."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport with the process's TLS context and, where it can, :class:`LargeReads`."""
    made = httpx.AsyncHTTPTransport(verify=ssl_context(), limits=limits)
    pool = getattr(made, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        pool._network_backend = LargeReads(pool._network_backend)
    return made


def large_reads(client_transport: object) -> bool:
    """Whether a transport made by :func:`transport` reads with :class:`LargeReads`."""
    pool = getattr(client_transport, "_pool", None)
    return isinstance(getattr(pool, "_network_backend", None), LargeReads)
